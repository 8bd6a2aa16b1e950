//! The `kube-ovn-agent` binary: CLI dispatch, logging and exit statuses.

use std::{
    io::IsTerminal as _,
    process::ExitCode,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::Parser;
use kube_ovn_agent::{
    agent::{self, Agent, KernelDatapath, Setup, StartupClock},
    cli::{Cli, Command, KubeProxyMode, Mode, RunArgs},
    datapath::attach::{self, AttachConfig},
    datapath::pins::PinRoot,
    datapath::pins::{BpffsError, EXIT_ROOT_IN_USE},
    datapath::{Datapath, object},
    diag,
    host::ipset,
    host::netlink,
    metrics::{self, Health, Metrics},
    ops::cleanup,
    ops::inspect,
    ops::preflight,
    ops::probe,
    ops::uninstall,
    ops::verify,
    source::{self, Running, SourceSpec},
    translate::{KubeProxySets, Options},
};
use tracing_subscriber::{EnvFilter, fmt};

const NODE_RESYNC: Duration = Duration::from_secs(30);

/// When `main` began: the origin of `run`'s startup phases.
static STARTED: OnceLock<Instant> = OnceLock::new();

fn main() -> ExitCode {
    STARTED.get_or_init(Instant::now);
    let cli = Cli::parse();
    // netlink-packet-route warns about every attribute newer kernels extend; not actionable.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},netlink_packet_route=error", cli.log_level))
    });
    // aya logs through the `log` crate; the subscriber's `tracing-log` bridge carries it over.
    // Logs go to stderr in both formats: stdout carries command output (`status --json`, …).
    if cli.log_json {
        fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colour codes only for a terminal, never into a file or a container log.
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
    let json = cli.log_json;
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let line = diag::render(error.chain());
            if json {
                tracing::error!(error = %line, "exiting");
            } else {
                eprintln!("error: {line}");
            }
            let in_use = error
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(BpffsError::InUse { .. })));
            if in_use {
                ExitCode::from(EXIT_ROOT_IN_USE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `probe`: the targets given or chosen, then the traffic; the report on stdout.
fn probe(args: &kube_ovn_agent::cli::ProbeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let targets = if args.targets.is_empty() {
        let node_name = args
            .node_name
            .clone()
            .context("--node-name (or $NODE_NAME) is needed to choose the targets")?;
        let snapshot = runtime.block_on(probe::read_cluster(&args.source))?;
        probe::select(
            &snapshot,
            &probe::SelectOptions {
                node_name,
                cluster_router: args.cluster_router.clone(),
                service_cluster_ip_range: args.service_cluster_ip_range.0.clone(),
                max_targets: usize::from(args.max_targets),
            },
        )?
    } else {
        args.targets.clone()
    };
    if args.dry_run {
        for target in &targets {
            println!("{target}");
        }
        return Ok(());
    }
    let report = runtime.block_on(probe::run(
        &targets,
        &probe::Limits {
            rate: args.rate,
            duration: args.duration,
            count: args.count,
            connect_timeout: args.connect_timeout,
        },
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(*args)),
        Command::Status(args) => Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(inspect::status(&(&args.read).into(), args.agent))?),
        Command::Dump(args) => Ok(inspect::dump(&(&args).into())?),
        Command::Detach(args) => Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(inspect::detach(&(&args).into()))?),
        Command::Verify(args) => {
            let options = verify::Options {
                root: args.root.bpffs_root,
                window: args.window,
                tolerance_bp: args.tolerance,
                per_packet: !args.connections_only,
            };
            let report = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(verify::run(&options))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            std::process::exit(report.verdict.exit_code());
        }
        Command::Preflight(args) => {
            let mut checks =
                preflight::evaluate(&preflight::Facts::read(&args.read.root.bpffs_root));
            if let Some(target) = &args.kube_ovn_cni.0 {
                let found = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(preflight::read_kube_ovn_cni(target));
                let ours = preflight::Ours {
                    service_cidrs: args.service_cluster_ip_range.0.clone(),
                    cluster_router: args.cluster_router.clone(),
                    enable_tproxy: args.enable_tproxy,
                };
                checks.extend(preflight::evaluate_kube_ovn(target, &found, &ours));
            }
            if args.read.json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", preflight::text(&checks));
            }
            anyhow::ensure!(!preflight::failed(&checks), "a preflight check failed");
            Ok(())
        }
        Command::Probe(args) => probe(&args),
        Command::UninstallWait(args) => {
            let done = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(uninstall::wait(
                    &args.daemonset,
                    args.timeout,
                    Duration::from_secs(2),
                ))?;
            println!("{}: {done}", args.daemonset);
            Ok(())
        }
        Command::CleanupIptables(args) => {
            let state = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(cleanup::datapath_state(&args.root.bpffs_root));
            let options = cleanup::Options {
                dry_run: args.dry_run,
                force: args.force,
            };
            let outcome = cleanup::run(options, &state)?;
            print!("{}", outcome.text());
            anyhow::ensure!(!outcome.failed(), "some rules could not be removed");
            Ok(())
        }
    }
}

/// `run`'s setup: pins, the source, the datapath, the metrics server; then the loop.
async fn run(args: RunArgs) -> Result<()> {
    let node_name = match &args.node_name {
        Some(name) => name.clone(),
        None => hostname().context("no --node-name, no $NODE_NAME and no hostname")?,
    };
    let mut clock = StartupClock::new(*STARTED.get_or_init(Instant::now));
    let mut pins = PinRoot::new(&args.root.bpffs_root);
    pins.not_persistent = pins.prepare()?;
    if let Some(why) = &pins.not_persistent {
        tracing::warn!(
            reason = %why,
            "the pins will not persist: marking stops on interfaces attached through tcx when \
             this agent exits, and a restart starts from scratch; give the agent the host's \
             bpffs (mount one at /sys/fs/bpf on the host)"
        );
    }
    // Before anything is loaded or written: a second agent on this root must change nothing.
    let lock = pins.lock()?;
    clock.phase("pins");
    // The sources list the cluster on the runtime's workers while this thread has the program
    // verified (~100 ms each at 10 000 Services): started first, the two overlap.
    let list_start = clock.last();
    let running = start_source(&args, &node_name).await?;
    clock.phase("source_start");
    let mut datapath = open_datapath(&pins, load_config(&args), &mut clock)?;

    let mut metrics = Metrics::new();
    metrics::register_bpffs_persistent(&mut metrics.registry, pins.not_persistent.is_none());
    let metrics = Arc::new(metrics);
    metrics.set_build_info(&datapath.program_tag());
    metrics.set_mode(args.mode == Mode::Shadow);
    let health = Arc::new(Health::default());
    *metrics.live.counters.lock().expect("lock") = datapath.take_counters();
    if let Some(addr) = args.metrics_addr.0 {
        let (m, h) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m, h).await {
                tracing::error!(%addr, error = %e, "metrics server stopped");
            }
        });
    }

    let node_net = netlink::watch(NODE_RESYNC).context("watching interfaces and routes")?;
    let rtnl = netlink::connect().context("opening rtnetlink")?;

    let attach_config = AttachConfig {
        mode: args.attach.resolve(),
        tcx_order: args.tcx_order,
        priority: args.tc_priority,
        handle: args.tc_handle,
    };
    let attached = attach::list(&pins, &rtnl)
        .await
        .into_iter()
        .map(|a| (a.ifname.clone(), a))
        .collect();
    let detected = detect_kube_proxy_at_start(args.kube_proxy_mode)?;
    let options = Options {
        cluster_router: args.cluster_router.clone(),
        service_cluster_ip_range: args.service_cluster_ip_range.0.clone(),
        service_match: args.service_match.into(),
        kube_proxy_sets: detected.map_or_else(
            || agent::kube_proxy_sets(args.kube_proxy_mode, KubeProxySets::default()),
            |d| d.sets,
        ),
        shadow: args.mode == Mode::Shadow,
        tproxy_port: args.enable_tproxy.then_some(args.tproxy_port),
    };
    tracing::info!(
        version = kube_ovn_agent::cli::LONG_VERSION,
        node = %node_name,
        attach = ?attach_config.mode,
        service_match = ?args.service_match,
        kube_proxy = ?args.kube_proxy_mode,
        mode = ?args.mode,
        "agent started"
    );
    metrics
        .live
        .map_capacities
        .lock()
        .expect("lock")
        .clone_from(&datapath.tables.capacities());
    let kernel = KernelDatapath::new(datapath, pins.clone(), attach_config, rtnl);
    clock.phase("setup");
    let mut agent = Agent::new(Setup {
        config: agent::Config::from(&args),
        node_name,
        pins,
        lock,
        kernel,
        attach_config,
        attached,
        options,
        metrics,
        health,
        kube_proxy: detected.map(|d| d.mode),
        startup: Some((clock, list_start)),
    });
    Ok(agent.main_loop(running, node_net).await?)
}

/// The values frozen into the program: what the flags leave possible, and the node's
/// `nf_conntrack_tcp_loose` (design §1).
fn load_config(args: &RunArgs) -> object::LoadConfig {
    object::LoadConfig::new(
        args.service_match.into(),
        args.enable_tproxy,
        object::tcp_loose(),
    )
}

/// The program and maps: the pinned ones when they are this build's, else loaded.
fn open_datapath(
    pins: &PinRoot,
    load_config: object::LoadConfig,
    clock: &mut StartupClock,
) -> Result<Datapath> {
    let datapath = Datapath::open(pins, load_config).context("loading the datapath")?;
    clock.phase("datapath");
    clock.program(datapath.loaded.as_str());
    tracing::info!(
        root = %pins.root.display(),
        program_id = datapath.program_id,
        program = datapath.loaded.as_str(),
        upgrading = datapath.upgrading,
        "datapath ready; pinned maps adopted"
    );
    Ok(datapath)
}

async fn start_source(args: &RunArgs, node_name: &str) -> Result<Running> {
    Ok(match &args.source {
        SourceSpec::Kube => source::kube::start(&source::kube::KubeOptions {
            watch_pods: args.enable_tproxy,
            ..source::kube::KubeOptions::new(node_name)
        })
        .await
        .context("starting the Kubernetes source")?,
        SourceSpec::File(path) => source::file::start(source::file::FileOptions {
            node_name: Some(node_name.to_owned()),
            max_bytes: args.source_max_bytes,
            shrink_hold: args.source_shrink_hold,
            ..source::file::FileOptions::new(path)
        })
        .context("starting the file source")?,
    })
}

/// In `auto` mode kube-proxy's mode is known before the first sync: a first sync in the wrong
/// mode would prune and rewrite the sets of the right one (on a restart, every ClusterIP entry).
/// Failing to ask is fatal here; the pinned datapath stays as it is.
fn detect_kube_proxy_at_start(mode: KubeProxyMode) -> Result<Option<ipset::Detection>> {
    if mode != KubeProxyMode::Auto {
        return Ok(None);
    }
    let detection =
        ipset::detect_kube_proxy().context("detecting kube-proxy's mode before the first sync")?;
    tracing::info!(mode = %detection.mode, sets = ?detection.sets, "kube-proxy detected");
    Ok(Some(detection))
}

fn hostname() -> Option<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length.
    if unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } != 0 {
        return None;
    }
    let end = buffer.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&buffer[..end]).ok().map(str::to_owned)
}
