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
        /// Where large payloads are offloaded: `auto` (a local moto_server when installed),
        /// `none`, or an S3-compatible endpoint URL (bucket `portcullis-dev`).
        #[arg(long, value_name = "auto|none|URL", default_value = "auto")]
        object_store: String,
    },
    /// Manage key-encryption keys: a local keyring, or keys on a PKCS#11 token.
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
    /// List the secret keys on the PKCS#11 token of a `pkcs11` key in the config: which this
    /// key may use, which seals, and their attributes (sensitive, extractable, usages).
    Pkcs11List {
        #[arg(long, short, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        /// The key's name in `[encryption.keys]` (needed when several are `pkcs11`).
        #[arg(long)]
        key: Option<String>,
    },
    /// Create a non-extractable AES-256 key on that token (development on SoftHSM; also the
    /// rotation step: with `key_label`, a new key with the next CKA_ID becomes the primary on
    /// running proxies within `rotation_check_seconds`).
    Pkcs11Create {
        #[arg(long, short, env = "PORTCULLIS_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        key: Option<String>,
        /// CKA_LABEL (default: the key's `key_label`).
        #[arg(long)]
        label: Option<String>,
        /// CKA_ID in hex (default: one more than the highest id among keys with that label).
        #[arg(long)]
        id: Option<String>,
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
            object_store,
        } => {
            portcullis::dev::run(portcullis::dev::DevOptions {
                dir,
                upstream,
                listen,
                namespaces,
                codec_listen,
                object_store,
            })
            .await
        }
        Command::Keys {
            action: KeysAction::Pkcs11List { config, key },
        } => {
            let provider = pkcs11_provider(&config, key.as_deref()).await?;
            let keys = provider.list_keys().await?;
            println!(
                "{:<24} {:<12} {:<6} {:>5} {:<9} {:<11} {:<24} KEY ID",
                "LABEL", "ID", "TYPE", "BITS", "SENSITIVE", "EXTRACTABLE", "USAGE"
            );
            let flag = |b: Option<bool>| match b {
                Some(true) => "yes",
                Some(false) => "no",
                None => "?",
            };
            for k in &keys {
                let usage: Vec<&str> = [
                    (k.encrypt, "encrypt"),
                    (k.decrypt, "decrypt"),
                    (k.wrap, "wrap"),
                    (k.unwrap, "unwrap"),
                ]
                .into_iter()
                .filter(|(b, _)| *b == Some(true))
                .map(|(_, name)| name)
                .collect();
                println!(
                    "{:<24} {:<12} {:<6} {:>5} {:<9} {:<11} {:<24} {}{}",
                    k.label,
                    portcullis::crypto::pkcs11::hex(&k.id),
                    k.key_type,
                    k.value_len.map(|n| (n * 8).to_string()).unwrap_or_default(),
                    flag(k.sensitive),
                    flag(k.extractable),
                    usage.join(","),
                    k.kek_id.as_deref().unwrap_or("-"),
                    if k.primary { "  (primary: seals)" } else { "" }
                );
            }
            Ok(())
        }
        Command::Keys {
            action:
                KeysAction::Pkcs11Create {
                    config,
                    key,
                    label,
                    id,
                },
        } => {
            let id = id
                .map(|id| portcullis::crypto::pkcs11::parse_hex_id(&id))
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?;
            let provider = pkcs11_provider(&config, key.as_deref()).await?;
            let kek_id = provider.create_key(label, id).await?;
            println!("created a non-extractable AES-256 key: {kek_id}");
            Ok(())
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
                KeysAction::Pkcs11List { .. } | KeysAction::Pkcs11Create { .. } => {
                    anyhow::bail!("pkcs11 key commands are handled above")
                }
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

/// The provider of a `pkcs11` key in a config file (`name`, or the only one).
async fn pkcs11_provider(
    path: &std::path::Path,
    name: Option<&str>,
) -> anyhow::Result<portcullis::crypto::pkcs11::Pkcs11Provider> {
    use portcullis::crypto::config::KeyConfig;
    let config = Config::load(path)?;
    let mut found = config
        .encryption
        .keys
        .iter()
        .filter(|(key, _)| name.is_none_or(|n| n == key.as_str()))
        .filter_map(|(key, c)| match c {
            KeyConfig::Pkcs11(p11) => Some((key.clone(), p11.clone())),
            _ => None,
        });
    let (_, p11) = match (found.next(), found.next()) {
        (Some(one), None) => one,
        (None, _) => anyhow::bail!(
            "{}: no pkcs11 key{} in [encryption.keys]",
            path.display(),
            name.map(|n| format!(" named {n:?}")).unwrap_or_default()
        ),
        (Some(_), Some(_)) => anyhow::bail!("{}: several pkcs11 keys: pass --key", path.display()),
    };
    Ok(portcullis::crypto::pkcs11::Pkcs11Provider::new(&p11).await?)
}
