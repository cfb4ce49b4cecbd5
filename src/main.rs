#![forbid(unsafe_code)]
//! The `portcullis` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use portcullis::config::Config;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "An authenticating, encrypting gRPC proxy for Temporal"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "PORTCULLIS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Serve {
        #[arg(long, short, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
    },
    /// Run a complete development setup: dev CA and certificates, a Temporal dev server, the proxy.
    Dev {
        /// Where certificates, config, database and endpoints.json live (created once, reused).
        #[arg(long, default_value = ".portcullis-dev")]
        dir: PathBuf,
        /// Use this Temporal frontend instead of starting a dev server.
        #[arg(long, value_name = "HOST:PORT")]
        upstream: Option<String>,
        /// Where the proxy listens.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7443")]
        listen: String,
        /// Namespaces to serve (and create on the dev server). Default: `default`.
        #[arg(long = "namespace", short = 'n')]
        namespaces: Vec<String>,
        /// Where the codec server listens (loopback only; port 0 picks a free one).
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7444")]
        codec_listen: String,
    },
    /// Manage a local keyring of key-encryption keys.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Validate a config file and everything it points to: certificate chains and expiry, a
    /// seal and open with every key, policies, upstream reachability. Exits 1 on any failure.
    Check {
        #[arg(long, short, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// Warn about certificates that expire within this many days.
        #[arg(long, default_value_t = 30)]
        warn_days: u64,
        /// Do not connect to upstreams.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a new keyring with one key (refuses to overwrite an existing file).
    Init {
        #[arg(long)]
        keyring: PathBuf,
    },
    /// Add a new key and make it primary: new data keys are wrapped with it, older keys still open.
    Rotate {
        #[arg(long)]
        keyring: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let spec = std::env::var("PORTCULLIS_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .ok()
        .filter(|_| !spec.trim().is_empty())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // The file watcher traces every event in the watched directories. A log file written into
    // one of them (next to the config) would then feed itself: each line an event, each event
    // a line. Keep it quiet unless asked for by name.
    if !spec.contains("notify") {
        if let Ok(directive) = "notify=warn".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            portcullis::server::start(config)
                .await?
                .run_until_signal()
                .await;
            Ok(())
        }
        Command::Dev {
            dir,
            upstream,
            listen,
            namespaces,
            codec_listen,
        } => {
            portcullis::dev::run(portcullis::dev::DevOptions {
                dir,
                upstream,
                listen,
                namespaces,
                codec_listen,
            })
            .await
        }
        Command::Keys { action } => {
            let (verb, keyring) = match action {
                KeysAction::Init { keyring } => (
                    "created",
                    portcullis::crypto::Keyring::init(&keyring).map(|k| (k, keyring))?,
                ),
                KeysAction::Rotate { keyring } => (
                    "rotated",
                    portcullis::crypto::Keyring::rotate(&keyring).map(|k| (k, keyring))?,
                ),
            };
            let (ring, path) = keyring;
            println!(
                "{}: {verb}; primary key {} ({} keys)",
                path.display(),
                ring.primary_id(),
                ring.key_ids().count()
            );
            Ok(())
        }
        Command::Check {
            config,
            warn_days,
            offline,
        } => {
            let options = portcullis::check::CheckOptions {
                warn_days,
                offline,
                ..Default::default()
            };
            let report = portcullis::check::run(&config, &options).await;
            print!("{}", report.render());
            match report.failed() {
                0 => Ok(()),
                n => anyhow::bail!("{}: {n} checks failed", config.display()),
            }
        }
    }
}
