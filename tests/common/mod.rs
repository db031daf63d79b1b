//! Harness for GPU integration tests (`harness = false` targets, libtest-mimic).
//!
//! Without a usable GPU every test is reported as *ignored* with the reason ("no CUDA device",
//! "kernels not built", ...), so the skip count shows in the summary line. With
//! `DEEPKERN_REQUIRE_GPU=1` the same situation is a failure: a GPU host can never pass by skipping.
//!
//! In a simulated build (`DEEPKERN_SIM=1`, docs/simulator.md) the same tests run on the simulator:
//! the header line says so, each test picks its simulated problem sizes with [`Gpu::pick`], and a
//! test the simulator cannot run is declared with its reason in [`run_with`] and reported as
//! ignored there (and only there).
//!
//! Inputs are random with a fresh seed per run, printed at the start; `DEEPKERN_SEED=<n>`
//! reproduces a run.

#![allow(dead_code)]

use std::sync::Arc;

use deepkern::cudarc::driver::CudaStream;
use deepkern::{Device, Error};
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// What a GPU test returns; any error message fails it.
pub type TestResult = Result<(), Failed>;

/// A GPU test: a name and a function of the shared [`Gpu`].
pub type GpuTest = (&'static str, fn(&Gpu) -> TestResult);

/// The device every test of a binary shares, and the run's seed.
pub struct Gpu {
    pub device: Device,
    pub seed: u64,
    /// The device is the deepkern simulator, not a GPU.
    pub simulated: bool,
}

impl Gpu {
    /// A fresh stream for one test (tests run in parallel threads).
    pub fn stream(&self) -> Arc<CudaStream> {
        self.device.new_stream().expect("create a CUDA stream")
    }

    /// `hardware` on a GPU, `simulated` on the simulator: a test's problem sizes, chosen so that the
    /// simulated suite stays within its time budget while still covering every layout and edge.
    pub fn pick<T>(&self, hardware: T, simulated: T) -> T {
        if self.simulated { simulated } else { hardware }
    }

    /// A random generator for one test, derived from the run's seed and the test's name.
    pub fn rng(&self, test: &str) -> StdRng {
        let salt = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        StdRng::seed_from_u64(self.seed ^ salt)
    }
}

/// Whether `DEEPKERN_REQUIRE_GPU=1` is set.
pub fn gpu_required() -> bool {
    std::env::var("DEEPKERN_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The GPU to test on, or why there is none.
pub fn open_gpu() -> Result<Device, String> {
    if !deepkern::kernels_built() {
        return Err("kernels not built (no nvcc at build time)".into());
    }
    if !deepkern::cuda_available() {
        return Err("no CUDA device".into());
    }
    let device = Device::new(0).map_err(|e| format!("cannot open CUDA device 0: {e}"))?;
    match device.check_supported() {
        Ok(()) => Ok(device),
        Err(Error::UnsupportedArch { found, .. }) => Err(format!("GPU is sm_{}{}, kernels need sm_90a", found.0, found.1)),
        Err(e) => Err(e.to_string()),
    }
}

fn seed() -> u64 {
    std::env::var("DEEPKERN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    })
}

/// Runs `tests` as libtest-mimic trials and exits with the harness' status.
pub fn run(tests: Vec<GpuTest>) -> ! {
    run_with(tests, &[])
}

/// As [`run`], with the tests the simulator cannot run and why: on a simulated build those are
/// reported as ignored with the reason; on a GPU they run.
pub fn run_with(tests: Vec<GpuTest>, not_simulated: &[(&'static str, &'static str)]) -> ! {
    run_with_all(tests, not_simulated, &[], &[])
}

/// As [`run_with`], also with the tests only the simulator can run and why (e.g. they write into
/// device memory from a host thread while a kernel runs): on a GPU those are reported as ignored
/// with the reason.
pub fn run_with_sets(
    tests: Vec<GpuTest>,
    not_simulated: &[(&'static str, &'static str)],
    simulator_only: &[(&'static str, &'static str)],
) -> ! {
    run_with_all(tests, not_simulated, simulator_only, &[])
}

/// What a test needs beyond the shared device (e.g. one GPU per rank): `None` when this host has
/// it, else why not. The test is then reported as ignored with the reason, even with
/// `DEEPKERN_REQUIRE_GPU=1` (a host that has the GPU the others need runs everything it can; a
/// host with enough GPUs runs these too).
pub type Requirement = (&'static str, fn() -> Option<String>);

/// As [`run_with`], with the tests' [`Requirement`]s.
pub fn run_with_requirements(tests: Vec<GpuTest>, not_simulated: &[(&'static str, &'static str)], requirements: &[Requirement]) -> ! {
    run_with_all(tests, not_simulated, &[], requirements)
}

/// The general form of [`run_with_sets`] and [`run_with_requirements`].
pub fn run_with_all(
    tests: Vec<GpuTest>,
    not_simulated: &[(&'static str, &'static str)],
    simulator_only: &[(&'static str, &'static str)],
    requirements: &[Requirement],
) -> ! {
    let named = not_simulated.iter().chain(simulator_only).map(|(n, _)| n).chain(requirements.iter().map(|(n, _)| n));
    for name in named {
        assert!(tests.iter().any(|(t, _)| t == name), "a skip list names `{name}`, which is not a test of this binary");
    }
    let args = Arguments::from_args();
    let gpu = match open_gpu() {
        Ok(device) => {
            let seed = seed();
            let i = device.info();
            if deepkern::simulated() {
                eprintln!(
                    "SIMULATED GPU tests: {} ({} SMs), DEEPKERN_SIM_SEED={} DEEPKERN_SEED={seed}; these results come from the simulator, not from a GPU",
                    i.name,
                    i.sm_count,
                    deepkern::simulator_seed().unwrap_or_default()
                );
            } else {
                eprintln!(
                    "GPU tests on {} (sm_{}{}, {} SMs), DEEPKERN_SEED={seed}",
                    i.name, i.compute_capability.0, i.compute_capability.1, i.sm_count
                );
            }
            Ok(Arc::new(Gpu { device, seed, simulated: deepkern::simulated() }))
        }
        Err(reason) => {
            if gpu_required() {
                eprintln!("DEEPKERN_REQUIRE_GPU=1 but {reason}: every GPU test fails");
            } else {
                eprintln!("{reason}: GPU tests are ignored (set DEEPKERN_REQUIRE_GPU=1 to make this a failure)");
            }
            Err(reason)
        }
    };
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let gpu = gpu.clone();
            let skip = not_simulated.iter().find(|(n, _)| *n == name).map(|(_, why)| *why);
            let sim_only = simulator_only.iter().find(|(n, _)| *n == name).map(|(_, why)| *why);
            let needs = requirements.iter().find(|(n, _)| *n == name).map(|(_, f)| *f);
            Trial::ignorable_test(name, move || match gpu {
                Ok(gpu) if gpu.simulated && skip.is_some() => {
                    Ok(Completion::ignored_with(format!("not simulated: {}", skip.unwrap_or_default())))
                }
                Ok(gpu) if !gpu.simulated && sim_only.is_some() => {
                    Ok(Completion::ignored_with(format!("simulator only: {}", sim_only.unwrap_or_default())))
                }
                Ok(gpu) => match needs.and_then(|f| f()) {
                    Some(why) => Ok(Completion::ignored_with(why)),
                    None => test(&gpu).map(|()| Completion::Completed),
                },
                Err(reason) if gpu_required() => Err(format!("DEEPKERN_REQUIRE_GPU=1 but {reason}").into()),
                Err(reason) => Ok(Completion::ignored_with(reason)),
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Fails with `msg` unless `cond` holds.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> TestResult {
    if cond { Ok(()) } else { Err(msg().into()) }
}
