use clap::Parser;

fn main() {
    infimed::alloc::reuse_freed_memory();
    // Die quietly on a closed stdout (`infimed ... | head`) as Unix tools do, instead of
    // panicking in println! (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = infimed::cli::Cli::parse();
    infimed::cli::init_tracing();
    if let Err(err) = infimed::cli::run(cli) {
        eprintln!("error: {err:#}");
        // A run stopped by SIGTERM / SIGINT exits as a shell reports a process the signal ended.
        let code = err
            .downcast_ref::<infimed::learn::stop::Interrupted>()
            .map_or(1, |i| i.exit_code());
        std::process::exit(code);
    }
}
