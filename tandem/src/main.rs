//! The `tandem` binary: parses the command line once into typed options and dispatches to a subcommand.
//! Each subcommand lives in `cmd/`; this file only parses and sets up logging and threads.

mod cmd;
mod progress;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Tandem: a disaggregated LLM serving cluster (engine, prefill and decode workers, router).
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    /// Worker threads for model compute (default: all cores).
    #[arg(long, global = true, env = "TANDEM_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, streamed to stdout (no servers involved).
    Generate(cmd::generate::GenerateArgs),
    /// Measure model quality.
    #[command(subcommand)]
    Eval(cmd::eval::EvalCommand),
    /// Measure speed.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Run a whole local cluster in one process: router + prefill + decode workers (the embedded default).
    Up(cmd::up::UpArgs),
    /// Run a prefill worker.
    Prefill(cmd::serve::PrefillArgs),
    /// Run a decode worker.
    Decode(cmd::serve::DecodeArgs),
    /// Run a router (OpenAI HTTP + gRPC) in front of prefill and decode workers.
    Router(cmd::serve::RouterArgs),
    /// Compare routing policies on a simulated cluster driven by the real router index and policy code.
    Simulate(cmd::simulate::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as clap formats them.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors in one line (clap's first line names the argument); `--help` has the rest.
            let text = e.render().to_string();
            eprintln!(
                "{} (see --help)",
                text.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        eprintln!("error: --threads must be at least 1");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a, threads),
        Command::Eval(c) => cmd::eval::run(c, threads),
        Command::Bench(c) => cmd::bench::run(c, threads),
        Command::Up(a) => cmd::up::run(a, threads),
        Command::Prefill(a) => cmd::serve::run_prefill(a, threads),
        Command::Decode(a) => cmd::serve::run_decode(a, threads),
        Command::Router(a) => cmd::serve::run_router(a),
        Command::Simulate(a) => cmd::simulate::run(a, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, so scripts and people both get the whole reason.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
