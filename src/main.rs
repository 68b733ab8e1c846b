use clap::Parser;

fn main() {
    infimed::alloc::reuse_freed_memory();
    let cli = infimed::cli::Cli::parse();
    infimed::cli::init_tracing();
    if let Err(err) = infimed::cli::run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
