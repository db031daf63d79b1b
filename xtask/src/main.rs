use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bindgen") => {
            let root = xtask::project_root();
            match xtask::bindings::generate(&root) {
                Ok(text) => {
                    std::fs::write(root.join(xtask::bindings::OUTPUT), text).expect("write bindings");
                    println!("wrote {}", xtask::bindings::OUTPUT);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("usage: cargo xtask bindgen");
            ExitCode::FAILURE
        }
    }
}
