//! The simulator's own checks (a simulated build only: `DEEPKERN_SIM=1`, docs/simulator.md). Each
//! test runs one scenario of `sim/tests/selftest.cu`, a small kernel that breaks one rule or relies
//! on one guarantee, in a process of its own, and checks what the simulator reported: the kernel,
//! CTA, thread and source line of the offending operation, the error the host saw, and that a
//! failed kernel fails the process. A check the simulator claims but never fires would be worse
//! than none; these keep each one honest.
#![cfg(deepkern_sim)]

use std::process::Command;

/// What one scenario printed and how it ended.
struct Run {
    stdout: String,
    stderr: String,
    status: Option<i32>,
}

fn scenario(name: &str, seed: u64) -> Run {
    scenario_with(name, seed, &[])
}

/// A scenario with extra environment variables.
fn scenario_with(name: &str, seed: u64, env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(env!("DKSIM_SELFTEST"));
    c.arg(name).env("DEEPKERN_SIM_SEED", seed.to_string()).env_remove("DEEPKERN_SIM_ALLOW_FAILURES");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run the simulator's self-test");
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        status: out.status.code(),
    }
}

/// A scenario whose kernel must fail with `result`, the process with 101, and whose report must
/// hold every one of `report`.
fn fails(name: &str, result: &str, report: &[&str]) {
    let r = scenario(name, 7);
    assert!(r.stdout.contains(&format!("RESULT {result}\n")), "{name}: host saw {:?}, want {result}\nstderr:\n{}", r.stdout, r.stderr);
    for want in report.iter().chain(&["DEEPKERN_SIM_SEED=7", "simulated kernel failure"]) {
        assert!(r.stderr.contains(want), "{name}: the report lacks {want:?}:\n{}", r.stderr);
    }
    assert_eq!(r.status, Some(101), "{name}: a failed kernel must fail the process\n{}", r.stderr);
}

/// A scenario that must succeed, print every one of `stdout`, and report nothing.
fn passes(name: &str, stdout: &[&str]) -> Run {
    let r = scenario(name, 7);
    assert_eq!(r.status, Some(0), "{name}: exit status\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    for want in stdout.iter().chain(&["RESULT CUDA_SUCCESS"]) {
        assert!(r.stdout.contains(want), "{name}: stdout lacks {want:?}:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    }
    assert!(!r.stderr.contains("deepkern simulator:"), "{name}: unexpected report:\n{}", r.stderr);
    r
}

#[test]
fn write_past_the_end_faults_at_the_instruction() {
    fails(
        "oob_write_past_guard",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        &[
            "out-of-bounds global write",
            "28 bytes past the end of device allocation #1 of 4096 bytes",
            "write_at",
            "CTA (0, 0, 0), thread (0, 0, 0)",
            "selftest.cu:",
        ],
    );
}

#[test]
fn write_into_the_alignment_slack_is_found_when_the_kernel_ends() {
    fails(
        "oob_write_in_slack",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        &["bytes 4..7 past the end of device allocation #1 of 400 bytes", "write_at"],
    );
}

#[test]
fn read_before_the_start_faults() {
    fails("oob_read_before_start", "CUDA_ERROR_ILLEGAL_ADDRESS", &["out-of-bounds global read", "4 bytes before the start", "read_at"]);
}

#[test]
fn use_after_free_is_named() {
    fails(
        "use_after_free",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        &["use after free: read", "12 bytes into device allocation #1", "which was freed"],
    );
}

#[test]
fn null_pointers_are_named() {
    fails("null_pointer", "CUDA_ERROR_ILLEGAL_ADDRESS", &["invalid global read", "a null pointer"]);
}

#[test]
fn fresh_memory_reads_as_poison() {
    passes("fresh_memory_is_poisoned", &["POISONED 64 of 64"]);
}

#[test]
fn shared_memory_outside_the_window_faults() {
    fails("shared_oob", "CUDA_ERROR_ILLEGAL_ADDRESS", &["out-of-bounds shared write at shared address 50180", "shared_out_of_bounds"]);
}

#[test]
fn a_barrier_declared_with_two_counts_is_refused() {
    fails(
        "barrier_mismatch",
        "CUDA_ERROR_LAUNCH_FAILED",
        &["bar.sync 1 reached by a different set of threads than declared", "barrier_counts_differ"],
    );
}

#[test]
fn barriers_that_never_meet_are_a_deadlock_report() {
    fails(
        "barrier_deadlock",
        "CUDA_ERROR_LAUNCH_TIMEOUT",
        &[
            "deadlock",
            "waiting at bar.sync 1 (128 threads; 2 warps arrived)",
            "waiting at bar.sync 2 (128 threads; 2 warps arrived)",
            "barriers_never_meet",
        ],
    );
}

#[test]
fn exited_lanes_do_not_hold_up_syncthreads() {
    passes("partial_warp_exit", &["ARRIVED 64"]);
}

#[test]
fn a_shuffle_naming_an_exited_lane_is_refused() {
    let r = scenario("shuffle_exited", 7);
    assert!(r.stderr.contains("have already exited") || r.stderr.contains("exited while lanes"), "{}", r.stderr);
    assert!(r.stdout.contains("RESULT CUDA_ERROR_LAUNCH_FAILED") && r.status == Some(101), "{}\n{}", r.stdout, r.stderr);
}

#[test]
fn shuffles_and_votes_follow_ptx() {
    passes("warp_collectives", &["WRONG 0"]);
}

#[test]
fn a_spin_nobody_ends_is_a_deadlock_report() {
    fails(
        "spin_deadlock",
        "CUDA_ERROR_LAUNCH_TIMEOUT",
        &["deadlock", "4 warps spinning on ld.acquire.sys", "ptx.cuh", "selftest.cu", "(spin_on_flag)", "virtual time"],
    );
}

#[test]
fn timeouts_fire_in_virtual_time() {
    passes("timeout_fires", &["TIMED_OUT 1"]);
}

#[test]
fn a_kernel_may_wait_for_a_later_one_that_fits_beside_it() {
    passes("concurrent_kernels_fit", &[]);
}

#[test]
fn a_kernel_waiting_for_one_with_no_room_left_is_a_deadlock() {
    fails("concurrent_kernels_starve", "CUDA_ERROR_LAUNCH_TIMEOUT", &["deadlock", "0 of 264 CTAs done, 132 resident on SMs", "set_flag"]);
}

#[test]
fn traps_name_the_thread() {
    fails("trap", "CUDA_ERROR_LAUNCH_FAILED", &["__trap()", "CTA (2, 0, 0), thread (5, 0, 0)", "trap_in_block"]);
}

#[test]
fn misaligned_atomics_are_refused() {
    fails("misaligned", "CUDA_ERROR_MISALIGNED_ADDRESS", &["misaligned address: atomic of 4 bytes"]);
}

#[test]
fn a_failure_nobody_waited_for_still_fails_the_process() {
    let r = scenario("unsynchronised_failure", 7);
    assert!(r.stderr.contains("past the end of device allocation") && r.stderr.contains("1 simulated kernel failure"), "{}", r.stderr);
    assert_eq!(r.status, Some(101));
}

#[test]
fn the_seed_decides_the_interleaving() {
    let order = |seed| {
        let r = scenario("ticket_order", seed);
        assert_eq!(r.status, Some(0), "{}", r.stderr);
        r.stdout.lines().find(|l| l.starts_with("ORDER ")).expect("an ORDER line").to_string()
    };
    assert_eq!(order(11), order(11), "one seed, two interleavings");
    let distinct: std::collections::BTreeSet<String> = (20..26).map(order).collect();
    assert!(distinct.len() > 1, "six seeds, one interleaving: the scheduler does not vary");
}

#[test]
fn launch_configurations_are_checked_at_launch() {
    // DK_STATUS_CUDA_ERROR (5) for a 2048-thread block and for 64 KiB of dynamic shared memory
    // without the attribute, as the runtime refuses both.
    let r = scenario("launch_limits", 7);
    assert!(r.stdout.contains("BLOCK_2048 5 DYNAMIC_64K 5"), "{}\n{}", r.stdout, r.stderr);
}

#[test]
fn tensor_maps_follow_the_drivers_rules() {
    let r = passes("tensor_map_rules", &["OK CUDA_SUCCESS"]);
    for rule in ["MISALIGNED_ADDRESS", "STRIDE_NOT_16", "BOX_OVER_SWIZZLE", "INNER_BOX_NOT_16"] {
        assert!(r.stdout.contains(&format!("{rule} CUDA_ERROR_INVALID_VALUE")), "{rule}:\n{}", r.stdout);
    }
}

#[test]
fn a_barrier_orders_a_shared_handoff() {
    passes("shared_handoff_with_barrier", &[]);
}

/// Race mode only (a build with DEEPKERN_SIM_RACES=1): the same handoff without its barrier.
#[cfg(deepkern_sim_races)]
#[test]
fn an_unordered_shared_handoff_is_a_race() {
    fails(
        "shared_race",
        "CUDA_ERROR_LAUNCH_FAILED",
        &["data race on shared memory", "thread 0 (warp 0 lane 0)", "thread 32 (warp 1 lane 0)", "shared_handoff"],
    );
}

#[test]
fn release_and_acquire_order_a_handoff_between_ctas() {
    passes("flag_release_acquire", &[]);
}

#[test]
fn fences_around_relaxed_atomics_order_a_handoff_between_ctas() {
    passes("flag_fences", &[]);
}

#[test]
fn an_event_or_a_host_wait_orders_work_on_two_streams() {
    passes("cross_stream_event", &[]);
    passes("cross_stream_host_sync", &[]);
}

/// Race mode only: a flag set with a relaxed atomic and no fence.
#[cfg(deepkern_sim_races)]
#[test]
fn a_relaxed_flag_between_ctas_is_a_race() {
    fails(
        "flag_relaxed_race",
        "CUDA_ERROR_LAUNCH_FAILED",
        &["data race on global memory", "write by thread 0 (warp 0 lane 0) of block (0, 0, 0) of", "flag_handoff", "read by thread 0"],
    );
}

/// Race mode only: the writer's fence makes its flag a release, but the reader never acquires it
/// (no fence after its relaxed read).
#[cfg(deepkern_sim_races)]
#[test]
fn a_release_the_reader_never_acquires_is_a_race() {
    fails("flag_unacquired_race", "CUDA_ERROR_LAUNCH_FAILED", &["data race on global memory", "flag_handoff"]);
}

/// Race mode only: two streams' kernels on one buffer, with nothing ordering them.
#[cfg(deepkern_sim_races)]
#[test]
fn kernels_on_two_streams_with_no_event_race() {
    fails("cross_stream_race", "CUDA_ERROR_LAUNCH_FAILED", &["data race on global memory", "::fill at", "sum_into"]);
}

/// The bytes of rows 0..7 of the scenario's 64 x 16 matrix (byte i holds i % 7 + 1).
const TMA_BOX_SUM: u32 = 2045;

#[test]
fn a_tma_load_lands_through_its_mbarrier() {
    passes("tma_load", &[&format!("SUM {TMA_BOX_SUM} WANT {TMA_BOX_SUM} ")]);
}

#[test]
fn a_load_of_more_bytes_than_the_phase_expects_is_refused() {
    fails(
        "tma_more_bytes_than_expected",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        &["received 256 more transaction bytes than its phase expected", "tma_box", "asynchronous unit"],
    );
}

#[test]
fn a_cta_exiting_before_its_load_landed_fails() {
    fails("tma_load_in_flight_at_exit", "CUDA_ERROR_ILLEGAL_ADDRESS", &["a CTA exited while a TMA load had not landed", "tma_box"]);
}

#[test]
fn a_tma_store_needs_a_proxy_fence_after_generic_writes() {
    let unfenced = "generic-proxy writes changed with no fence.proxy.async.shared::cta since";
    fails("tma_store_without_proxy_fence", "CUDA_ERROR_ILLEGAL_ADDRESS", &[unfenced, "tma_box"]);
    // Writes before the CTA's first use of the async proxy count as well.
    fails("tma_store_of_early_writes_without_fence", "CUDA_ERROR_ILLEGAL_ADDRESS", &[unfenced, "tma_box"]);
    passes("tma_store_with_proxy_fence", &[&format!("SUM {TMA_BOX_SUM} WANT {TMA_BOX_SUM} STORED 512")]);
}

#[test]
fn setmaxnreg_moves_registers_between_warpgroups() {
    passes("setmaxnreg_moves_registers", &["DONE 256"]);
}

#[test]
fn setmaxnreg_beyond_the_pool_is_a_deadlock_report() {
    fails(
        "setmaxnreg_beyond_the_pool",
        "CUDA_ERROR_LAUNCH_TIMEOUT",
        &["deadlock", "4 warps spinning on setmaxnreg.inc 96 (needs 1024 registers; the CTA's pool has 0 free)", "registers_and_barriers"],
    );
}

#[test]
fn setmaxnreg_in_the_wrong_direction_is_refused() {
    fails("setmaxnreg_dec_upwards", "CUDA_ERROR_LAUNCH_FAILED", &["setmaxnreg.dec 256 with 64 registers per thread already"]);
}

#[test]
fn an_mbarrier_phase_nobody_completes_is_a_deadlock_report() {
    fails(
        "mbarrier_never_completes",
        "CUDA_ERROR_LAUNCH_TIMEOUT",
        &[
            "deadlock",
            "spinning on mbarrier.try_wait.parity (shared address 1024, parity 0: 1 of 1 arrivals missing",
            "registers_and_barriers",
        ],
    );
}

#[test]
fn wgmma_accumulators_are_undefined_until_its_wait() {
    passes("wgmma_accumulators", &["BEFORE_WAIT_NAN 1 AFTER 32\n"]);
}

// ---- The NCCL stand-in: ranks on host threads, each on a simulated device of its own --------------

/// A scenario of NCCL ranks: four simulated devices, and a short quiet time before a peer that
/// never posts is reported.
fn nccl_scenario(name: &str) -> Run {
    scenario_with(name, 7, &[("DEEPKERN_SIM_DEVICES", "4"), ("DEEPKERN_SIM_NCCL_TIMEOUT", "1")])
}

/// An NCCL scenario that must succeed with every one of `stdout` and report nothing.
fn nccl_passes(name: &str, stdout: &[&str]) {
    let r = nccl_scenario(name);
    assert_eq!(r.status, Some(0), "{name}: exit status\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    for want in stdout.iter().chain(&["RESULT CUDA_SUCCESS"]) {
        assert!(r.stdout.contains(want), "{name}: stdout lacks {want:?}:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    }
    assert!(!r.stderr.contains("deepkern simulator:"), "{name}: unexpected report:\n{}", r.stderr);
}

/// An NCCL scenario that must print every one of `stdout`, report every one of `report` and fail
/// the process.
fn nccl_fails(name: &str, stdout: &[&str], report: &[&str]) {
    let r = nccl_scenario(name);
    for want in stdout {
        assert!(r.stdout.contains(want), "{name}: stdout lacks {want:?}:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    }
    for want in report.iter().chain(&["DEEPKERN_SIM_SEED=7"]) {
        assert!(r.stderr.contains(want), "{name}: the report lacks {want:?}:\n{}", r.stderr);
    }
    assert_eq!(r.status, Some(101), "{name}: a reported NCCL failure must fail the process\n{}", r.stderr);
}

#[test]
fn clusters_multicast_into_every_cta_and_arrive_remotely() {
    passes("cluster_multicast", &["SUMS RIGHT 6 of 6"]);
    let r = scenario("cluster_odd_grid", 7);
    assert!(r.stdout.contains("ODD GRID REFUSED 1"), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("or a grid.x that is not a multiple of it"), "{}", r.stderr);
}

#[test]
fn a_multicast_needs_the_peers_barrier_initialised() {
    fails(
        "cluster_barrier_not_initialised",
        "CUDA_ERROR_LAUNCH_FAILED",
        &["no mbarrier was initialised at shared address", "of CTA rank 1", "cluster_multicast"],
    );
}

#[test]
fn an_arrival_on_a_cta_that_left_fails() {
    fails("cluster_peer_exits_early", "CUDA_ERROR_ILLEGAL_ADDRESS", &["CTA rank 1 of the cluster has exited", "cluster_multicast"]);
}

#[test]
fn implicit_synchronisations_wait_for_their_own_device_only() {
    nccl_passes("free_waits_for_its_own_device", &["FREED 1"]);
}

#[test]
fn nccl_collectives_on_two_and_four_ranks() {
    nccl_passes("nccl_collectives_2", &["RANKS 2 WRONG 0"]);
    nccl_passes("nccl_collectives_4", &["RANKS 4 WRONG 0"]);
}

#[test]
fn nccl_grouped_sends_and_receives_with_self_and_zero_bytes() {
    nccl_passes("nccl_send_recv_2", &["RANKS 2 WRONG 0"]);
    nccl_passes("nccl_send_recv_4", &["RANKS 4 WRONG 0"]);
}

#[test]
fn nccl_operations_are_stream_ordered() {
    // Rank 0's all-gather cannot finish (nor the memset behind it run) before rank 1's stream
    // reaches its part; what was sent is what the kernel before it wrote.
    nccl_passes("nccl_stream_order", &["QUERY_BEFORE CUDA_ERROR_NOT_READY WRONG 0"]);
}

#[test]
fn nccl_ranks_that_disagree_are_reported() {
    nccl_fails(
        "nccl_count_mismatch",
        &["RANK0 ncclInvalidUsage RANK1 ncclInvalidUsage"],
        &[
            "the ranks disagree at ncclAllGather #0 of communicator",
            "rank 0 posted ncclAllGather(4 x ncclInt32)",
            "rank 1 posted ncclAllGather(8 x ncclInt32)",
        ],
    );
    nccl_fails(
        "nccl_kind_mismatch",
        &["RANK0 ncclInvalidUsage RANK1 ncclInvalidUsage"],
        &[
            "waits for another: their calls do not match",
            "rank 0 waits at ncclAllGather(4 x ncclInt32)",
            "rank 1 waits at ncclSend(4 x ncclInt32 to rank 0)",
        ],
    );
}

#[test]
fn nccl_a_peer_that_never_takes_part_is_reported_not_waited_for() {
    nccl_fails(
        "nccl_peer_never_posts",
        &["RANK0 ncclRemoteError"],
        &[
            "waited 1 s (DEEPKERN_SIM_NCCL_TIMEOUT) for peers that never posted",
            "rank 0 of communicator",
            "ncclAllReduce(8 x ncclInt32, ncclSum)",
            "for rank 1",
        ],
    );
    nccl_fails("nccl_peer_destroys_first", &["RANK0 ncclRemoteError"], &["for rank 1, which left the communicator (ncclCommDestroy)"]);
    // Posted on the host, but rank 1's stream never reaches its part: the engine's deadlock report.
    nccl_fails(
        "nccl_peer_stream_never_reaches",
        &["RESULT CUDA_ERROR_LAUNCH_TIMEOUT"],
        &["deadlock", "ncclAllGather waits for ncclAllGather #0 of communicator", "rank 1 has not reached its part on its stream"],
    );
    // Rank 1 aborts (drops) its communicator before its part ran: both ranks' operations fail.
    nccl_fails(
        "nccl_peer_aborts_first",
        &["RESULT CUDA_ERROR_LAUNCH_FAILED"],
        &["rank 1 of communicator", "was aborted (ncclCommAbort", "before 1 of its operations had run", "ncclAllGather #0"],
    );
}

#[test]
fn nccl_wrong_arguments_are_invalid_arguments() {
    nccl_passes(
        "nccl_bad_arguments",
        &[
            "NULL ncclInvalidArgument PEER ncclInvalidArgument ROOT ncclInvalidArgument TYPE ncclInvalidArgument FP8_SUM \
             ncclInvalidArgument TOO_LONG ncclInvalidArgument ZERO ncclSuccess",
            "GROUP ncclInvalidArgument ncclInvalidArgument",
            "AFTER_DESTROY ncclInvalidArgument",
        ],
    );
}
