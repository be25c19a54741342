//! transportd: the node daemon and its commands. `main` parses the command line, starts
//! logging, and maps failures to exit codes: 64 usage, 65 data failed verification,
//! 69 a node could not be reached, 75 try again later (busy, not ready), 77 refused or not
//! permitted, 78 configuration, 1 other.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod admin;
mod cli;
mod cmd;
mod config;
mod demo;
mod env;
mod fsutil;
mod notify;
mod role;
mod telemetry;

use cli::{
    AuditCommand, CaCommand, Cli, Command, ConfigCommand, GenerateCommand, PolicyCommand,
    WorkloadCommand,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let default_log = match cli.command {
        Command::Node { .. } => "info",
        Command::Issuer(cli::IssuerArgs { command: None, .. }) => "info",
        _ => "warn",
    };
    if let Err(e) = telemetry::init(default_log) {
        eprintln!("error: {e:#}");
        return ExitCode::from(78);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("transportd")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cmd::exit_code(&e))
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Node { config } => role::node::run(&config).await,
        Command::Issuer(args) => cmd::issuer::run(args).await,
        Command::Ca(CaCommand::Init {
            trust_domain,
            out,
            validity,
            force,
        }) => cmd::ca::init(&trust_domain, &out, validity.into(), force),
        Command::Ca(CaCommand::Csr { id, out }) => cmd::ca::csr(&id, &out),
        Command::Ca(CaCommand::Issue {
            ca,
            id,
            csr,
            ttl,
            out,
        }) => cmd::ca::issue(&ca, &id, csr.as_deref(), ttl.into(), &out),
        Command::Config(ConfigCommand::Check { file }) => cmd::config_check(&file),
        Command::Config(ConfigCommand::Example) => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Policy(PolicyCommand::Check { file }) => cmd::policy::check(&file),
        Command::Policy(PolicyCommand::Explain {
            policy,
            config,
            peer,
            dataset,
            object,
            action,
            json,
        }) => cmd::policy::explain(&cmd::policy::ExplainArgs {
            policy: policy.as_deref(),
            config: config.as_deref(),
            peer: &peer,
            dataset: &dataset,
            object: object.as_deref(),
            action,
            json,
        }),
        Command::Policy(PolicyCommand::Grant {
            target,
            emergency: _,
            peer,
            dataset,
            ttl,
            reason,
            write,
            prefix,
            json,
        }) => {
            let grant = cmd::policy::emergency::Grant {
                peer,
                dataset,
                ttl: ttl.into(),
                reason,
                write,
                prefix,
            };
            cmd::policy::emergency::grant(&target, grant, json).await
        }
        Command::Policy(PolicyCommand::Approve { target, id, json }) => {
            cmd::policy::emergency::approve(&target, &id, json).await
        }
        Command::Policy(PolicyCommand::RevokeEmergency { target, id, json }) => {
            cmd::policy::emergency::revoke(&target, &id, json).await
        }
        Command::Policy(PolicyCommand::ListEmergency { target, json }) => {
            cmd::policy::emergency::list(&target, json).await
        }
        Command::Policy(PolicyCommand::Example) => {
            print!("{}", config::POLICY_EXAMPLE);
            Ok(())
        }
        Command::Audit(AuditCommand::Verify {
            dir,
            bundle,
            witness,
            witness_issuer,
            json,
        }) => {
            let receipts =
                cmd::audit::receipts(&dir, witness.as_deref(), witness_issuer.as_deref()).await?;
            cmd::audit::verify_cmd(&dir, bundle.as_deref(), receipts.as_deref(), json)
        }
        Command::Audit(AuditCommand::Report {
            dirs,
            from,
            to,
            dataset,
            class,
            out,
            format,
            bundle,
            witness,
        }) => cmd::audit::report::report_cmd(&cmd::audit::report::ReportArgs {
            dirs: &dirs,
            from: from.as_deref(),
            to: to.as_deref(),
            dataset: dataset.as_deref(),
            class,
            out: out.as_deref(),
            format,
            bundle: bundle.as_deref(),
            witness: &witness,
        }),
        Command::Audit(AuditCommand::Query {
            dir,
            peer,
            dataset,
            event,
            since,
            until,
            json,
        }) => cmd::audit::query_cmd(
            &dir,
            &cmd::audit::QueryArgs {
                peer: peer.as_deref(),
                dataset: dataset.as_deref(),
                event: event.as_deref(),
                since: since.as_deref(),
                until: until.as_deref(),
                json,
            },
        ),
        Command::Ls { conn, target, json } => match conn.sidecar.clone() {
            Some(socket) => cmd::sidecar::ls(&conn, &socket, target.as_deref(), json).await,
            None => cmd::client::ls(&conn, target.as_deref(), json).await,
        },
        Command::Pull {
            conn,
            source,
            dest,
            transfer,
        } => match conn.sidecar.clone() {
            Some(socket) => cmd::sidecar::pull(&conn, &socket, &source, &dest, transfer.json).await,
            None => cmd::client::pull(&conn, &source, &dest, &transfer).await,
        },
        Command::Push {
            conn,
            src,
            dest,
            transfer,
        } => match conn.sidecar.clone() {
            Some(socket) => cmd::sidecar::push(&conn, &socket, &src, &dest, transfer.json).await,
            None => cmd::client::push(&conn, &src, &dest, &transfer).await,
        },
        Command::Health {
            config,
            admin,
            issuer_socket,
            timeout,
        } => {
            let target = match (config, admin, issuer_socket) {
                (Some(c), _, _) => cmd::health::Target::Config(c),
                (None, Some(a), _) => cmd::health::Target::Admin(a),
                (None, None, Some(s)) => cmd::health::Target::IssuerSocket(s),
                // clap requires one of the three.
                (None, None, None) => anyhow::bail!("give --config, --admin or --issuer-socket"),
            };
            cmd::health::run(target, timeout.into()).await
        }
        Command::Generate(GenerateCommand::Completions { shell }) => {
            cmd::generate::completions(shell, &mut std::io::stdout())
        }
        Command::Generate(GenerateCommand::Man { dir }) => cmd::generate::man(&dir),
        Command::Demo { size, keep, json } => demo::run(size.as_u64(), keep, json).await,
        Command::Workload(WorkloadCommand::Fetch {
            socket,
            out,
            id,
            json,
        }) => cmd::workload::fetch(&socket, out.as_deref(), id.as_deref(), json).await,
    }
}
