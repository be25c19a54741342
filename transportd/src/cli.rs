//! The command line: every role and command, with help that teaches the set-up.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::env;

/// transportd moves datasets between storage and GPU nodes encrypted (TLS 1.3 over QUIC or
/// TCP), mutually authenticated by SPIFFE identity, verified chunk by chunk with BLAKE3, and
/// recorded in an audit trail.
///
/// A first look, with nothing set up: `transportd demo`.
///
/// By hand: `ca init` makes a trust domain, `ca issue` gives each node an SVID, `node`
/// serves datasets, and `ls`, `pull` and `push` move data with an SVID of their own.
#[derive(Debug, Parser)]
#[command(
    name = "transportd",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a node: serve the datasets under the store root and accept pushes into writable
    /// ones, over QUIC and TLS/TCP, to peers the access list allows.
    ///
    /// On SIGHUP the node re-reads its identity files and access list (the listeners stay).
    /// SIGTERM or SIGINT stop it after in-flight requests finish (10 s at most).
    Node {
        /// The node's configuration file (see `transportd config example`).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the identity issuer, or manage a running one: join tokens, registration entries,
    /// node bans, CA rollover.
    ///
    /// `transportd issuer --config issuer.toml` runs it (see `transportd issuer example`).
    /// It holds the trust domain's CA, attests nodes by single-use join tokens, renews their
    /// SVIDs, signs SVIDs for the workloads of registration entries, and pushes the trust
    /// bundle and revocations to every node. The other subcommands talk to a running issuer
    /// over its admin socket (as its user or root), so every change is in its audit trail.
    Issuer(IssuerArgs),
    /// Manage a trust domain's CA and issue X.509-SVIDs by hand (without an issuer).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Check or print configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check, explain or print access policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Verify, search or report on audit trails.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Use a SPIFFE Workload API as a workload does (SPIRE's agent, or the one `transportd
    /// node` serves to the processes on its node).
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// List datasets, or the objects of a dataset, on a node.
    Ls {
        #[command(flatten)]
        conn: ConnArgs,
        /// `DATASET` or `DATASET/PREFIX`; without it, list the datasets you may see.
        target: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pull an object (or a whole dataset) from a node, verified, into a local path.
    ///
    /// Every chunk is checked against the object's BLAKE3 manifest before it counts; the
    /// destination appears only when complete. Rerun the same command after an
    /// interruption: verified chunks are kept and only the missing ones are fetched.
    Pull {
        #[command(flatten)]
        conn: ConnArgs,
        /// `DATASET/OBJECT` for one object, or `DATASET` for every object in it.
        source: String,
        /// Destination file (one object) or directory (a dataset, or an object into a
        /// directory).
        dest: PathBuf,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Push a local file (or every file under a directory) into a writable dataset.
    ///
    /// The node verifies every chunk and makes the object visible only once all of it is
    /// durable on disk. Rerun after an interruption to resume.
    Push {
        #[command(flatten)]
        conn: ConnArgs,
        /// Local file or directory.
        src: PathBuf,
        /// `DATASET/OBJECT` for a file, or `DATASET[/PREFIX]` for a directory.
        dest: String,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Is a running node (or issuer) ready? Exits 0 if so, 75 if it answers but is not
    /// ready (its reason on stderr), 69 if nothing answers: for probes.
    ///
    /// A node is asked `GET /readyz` on its admin endpoint (ready only with a valid SVID and
    /// a writable audit trail); an issuer, over its admin socket, whether it serves. Give
    /// the daemon's own configuration file, or the address itself.
    ///
    /// As a Kubernetes exec probe, in the node's container (the admin endpoint may stay on
    /// loopback):
    ///
    ///     readinessProbe: {exec: {command: [transportd, health, --config, /etc/transportd/node.toml]}}
    ///
    /// With systemd, the units wait for the daemon's own `READY=1` (Type=notify); `health`
    /// is for timers, scripts and monitoring:
    ///
    ///     transportd health --admin 127.0.0.1:9464 || systemctl status transportd-node
    #[command(verbatim_doc_comment)]
    Health {
        /// The node's configuration file (its `[admin] listen` is asked), or the issuer's
        /// (its `admin_socket`).
        #[arg(long, short, conflicts_with_all = ["admin", "issuer_socket"], required_unless_present_any = ["admin", "issuer_socket"])]
        config: Option<PathBuf>,
        /// Or a node's admin endpoint, `HOST:PORT` (`0.0.0.0` is asked on loopback).
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "issuer_socket")]
        admin: Option<std::net::SocketAddr>,
        /// Or an issuer's admin socket (as its user or root).
        #[arg(long, value_name = "PATH")]
        issuer_socket: Option<PathBuf>,
        /// Give up, as unreachable, after this long (probes have their own timeouts: keep
        /// this below them).
        #[arg(long, value_name = "DURATION", default_value = "5s")]
        timeout: humantime::Duration,
    },
    /// Write shell completions or man pages, generated from this command line's own
    /// definition (for packages: install them where the shell and `man` look).
    #[command(subcommand)]
    Generate(GenerateCommand),
    /// Show the whole thing working: a trust domain, a storage node and a GPU node on
    /// loopback as separate processes with their own SVIDs, a synthetic dataset pulled over
    /// QUIC/mTLS and TLS/TCP, a checkpoint pushed back, everything verified; each path's
    /// rate beside what one bare TCP connection moves over loopback here.
    Demo {
        /// Size of the synthetic dataset, e.g. 1GiB or 64MiB.
        #[arg(long, default_value = "1GiB")]
        size: bytesize::ByteSize,
        /// Keep the trust domain, configs, data and audit trails in this directory (it
        /// must be empty or not exist) instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GenerateCommand {
    /// Print the completion script for a shell on stdout, e.g.
    /// `transportd generate completions bash > /usr/share/bash-completion/completions/transportd`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a man page for `transportd` and one for each of its subcommands
    /// (`transportd-node.1`, `transportd-issuer-token-create.1`, ...) into a directory, e.g.
    /// `/usr/share/man/man1`.
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
}

/// `transportd issuer`: run it, or one of its commands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct IssuerArgs {
    /// The issuer's configuration file: run the issuer.
    #[arg(long, short, required = true)]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Option<IssuerCommand>,
}

/// Which issuer to talk to.
#[derive(Debug, Args)]
pub(crate) struct AdminTarget {
    /// The issuer's configuration file (its admin socket is read from it).
    #[arg(
        long,
        short,
        conflicts_with = "socket",
        required_unless_present = "socket"
    )]
    pub(crate) config: Option<PathBuf>,
    /// Or the admin socket itself.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum IssuerCommand {
    /// Join tokens: how a node proves itself the first time.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries: which workloads on which node get which SPIFFE ID.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// CA rollover: `prepare` the next CA (nodes start trusting it), `activate` it (new
    /// SVIDs come from it), `retire` the old one once its last SVID has expired.
    #[command(subcommand)]
    Ca(IssuerCaCommand),
    /// Audit checkpoints the issuer witnessed for nodes.
    #[command(subcommand)]
    Witness(WitnessCommand),
    /// The issuer's CAs, nodes, pending tokens, counts and recent SVIDs.
    Status {
        #[command(flatten)]
        target: AdminTarget,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the trust bundle (PEM): give it to a new node as its `[agent] bundle`, which
    /// authenticates the issuer at the node's first contact.
    Bundle {
        #[command(flatten)]
        target: AdminTarget,
        /// Every CA the issuer ever had, retired ones too: for `audit verify --bundle` on
        /// trails older than a CA rollover. Never give this to a node as its bundle.
        #[arg(long)]
        all: bool,
    },
    /// Validate an issuer configuration file (including that the SVID TTL is at most the CA
    /// TTL divided by 6). Exits 0 if the issuer would start with it.
    Check {
        /// The file to check.
        file: PathBuf,
    },
    /// Print an annotated example issuer configuration.
    Example,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a single-use join token for a node. Give the printed token to the node (its
    /// `[agent] join_token_file`, or TRANSPORTD_JOIN_TOKEN); it is shown only this once, and
    /// the issuer keeps only its hash.
    Create {
        #[command(flatten)]
        target: AdminTarget,
        /// The SPIFFE ID the node gets, e.g. `spiffe://hospital.example/node/gpu-0`.
        #[arg(long)]
        node: String,
        /// How long the token may be used.
        #[arg(long, default_value = "10m")]
        ttl: humantime::Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum EntryCommand {
    /// Grant a SPIFFE ID to the workloads on one node that match every selector.
    Create {
        #[command(flatten)]
        target: AdminTarget,
        /// The workload's SPIFFE ID, e.g. `spiffe://hospital.example/gpu/loader`.
        #[arg(long)]
        spiffe_id: String,
        /// The node whose agent hands it out.
        #[arg(long)]
        parent_id: String,
        /// `unix:uid:<n>`, `unix:gid:<n>` or `unix:path:<executable>`; repeat to require
        /// several.
        #[arg(long = "selector", required = true)]
        selectors: Vec<String>,
        /// SVID lifetime for this entry (at most the issuer's SVID TTL).
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every registration entry.
    List {
        #[command(flatten)]
        target: AdminTarget,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete an entry; SVIDs already issued for it run out at their expiry.
    Delete {
        #[command(flatten)]
        target: AdminTarget,
        /// The entry's ID (from `entry list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// Ban a node: it can no longer renew, and the serials of its live SVIDs (and of its
    /// workloads') go out to every node as revoked, refused at once rather than at expiry.
    Ban {
        #[command(flatten)]
        target: AdminTarget,
        /// The node's SPIFFE ID.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum WitnessCommand {
    /// Print the countersigned checkpoints the issuer holds for a node, one JSON object a
    /// line, for `transportd audit verify DIR --witness FILE` (offline, anywhere).
    Export {
        #[command(flatten)]
        target: AdminTarget,
        /// The node's SPIFFE ID.
        #[arg(long)]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum IssuerCaCommand {
    /// Create the next CA and publish a bundle holding both.
    Prepare {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Sign with the prepared CA from now on.
    Activate {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Drop the previous CA from the bundle (refused while SVIDs it signed are valid).
    Retire {
        #[command(flatten)]
        target: AdminTarget,
        /// Retire it anyway: SVIDs it signed stop working at once.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a trust domain: a CA key and certificate, and a trust bundle holding it.
    ///
    /// Writes ca.pem, ca.key (mode 0600: guard it) and bundle.pem into the directory. Copy
    /// bundle.pem to every node; ca.key stays where SVIDs are issued.
    Init {
        /// The trust domain, e.g. `hospital.example`.
        #[arg(long)]
        trust_domain: String,
        /// Where to write the CA files.
        #[arg(long)]
        out: PathBuf,
        /// How long the CA certificate is valid.
        #[arg(long, default_value = "365d")]
        validity: humantime::Duration,
        /// Overwrite existing CA files.
        #[arg(long)]
        force: bool,
    },
    /// Create a private key and a certificate signing request on the node that will use
    /// them, so the key never leaves it. Send the CSR to whoever runs `ca issue --csr`.
    Csr {
        /// The SPIFFE ID to request, e.g. `spiffe://hospital.example/node/gpu-0`.
        #[arg(long)]
        id: String,
        /// Where to write svid.key (mode 0600) and svid.csr.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue an X.509-SVID signed by the CA.
    ///
    /// With `--csr`, signs that request (the key stays with whoever made it) and writes
    /// svid.pem. Without it, also generates the key here and writes svid.key (for test
    /// nodes and demos). bundle.pem is copied alongside either way.
    Issue {
        /// Directory holding ca.pem and ca.key (from `ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// The SPIFFE ID to certify, in the CA's trust domain.
        #[arg(long)]
        id: String,
        /// A certificate signing request (PEM) from `ca csr`.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Validity of the SVID; never past the CA's own expiry.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// Where to write svid.pem (and svid.key, bundle.pem).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate a node configuration file: syntax, unknown fields, identity files,
    /// addresses, store root. Exits 0 if the node would start with it.
    Check {
        /// The file to check.
        file: PathBuf,
    },
    /// Print an annotated example node configuration.
    Example,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate a policy file: syntax, unknown fields, subjects, patterns, rule names.
    /// Errors name the line. Exits 0 if a node would take it.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Decide one request as a node would, and say why: the dataset's class, every rule
    /// that matched, and the one that decided (deny rules win; nothing matching denies).
    Explain {
        /// The policy file.
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        policy: Option<PathBuf>,
        /// Or: a node configuration, whose policy (file or `[[allow]]` rules) is used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The requesting peer's SPIFFE ID.
        #[arg(long)]
        peer: String,
        /// The dataset.
        #[arg(long)]
        dataset: String,
        /// The object, for requests that name one.
        #[arg(long)]
        object: Option<String>,
        /// The action.
        #[arg(long, value_enum)]
        action: ActionArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print an annotated example policy.
    Example,
    /// Give emergency (break-glass) access on a running node: one peer may read one
    /// dataset for a bounded time, over the policy (deny rules included).
    ///
    /// The grant goes through the node's admin socket (the node's user, root, or
    /// `[emergency] group`); the node records it with the reason and your uid, records
    /// every access it allows (`emergency_used`), and ends it by itself when the TTL
    /// passes (`emergency_expired`). It allows exactly what it names: read and list of
    /// the dataset (`--write` adds writes; `--prefix` narrows it to objects under a
    /// path). With `[emergency] require_approval = true` it allows nothing until another
    /// operator (another uid) runs `transportd policy approve ID`.
    #[command(after_help = GRANT_EXAMPLES)]
    Grant {
        #[command(flatten)]
        target: NodeAdminTarget,
        /// Required: this command gives emergency grants only, and says so.
        #[arg(long, required = true)]
        emergency: bool,
        /// The one peer, an exact SPIFFE ID (no wildcards).
        #[arg(long)]
        peer: String,
        /// The one dataset.
        #[arg(long)]
        dataset: String,
        /// How long it lasts (`30m`, `4h`); at most the node's `[emergency] max_ttl`.
        #[arg(long)]
        ttl: humantime::Duration,
        /// Why: one line, recorded with the grant and with every use. Name the case, not
        /// the patient.
        #[arg(long)]
        reason: String,
        /// Allow writes too.
        #[arg(long)]
        write: bool,
        /// Only objects under this path (`patient-17/` or `patient-17`); listing the
        /// dataset is then not allowed.
        #[arg(long)]
        prefix: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending emergency grant (needs another uid than the one who gave it).
    Approve {
        #[command(flatten)]
        target: NodeAdminTarget,
        /// The grant's ID (`eg-...`).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End an emergency grant before its TTL.
    RevokeEmergency {
        #[command(flatten)]
        target: NodeAdminTarget,
        /// The grant's ID (`eg-...`).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the emergency grants a node holds: pending and active.
    ListEmergency {
        #[command(flatten)]
        target: NodeAdminTarget,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which running node's admin socket to talk to.
#[derive(Debug, Args)]
pub(crate) struct NodeAdminTarget {
    /// The node's configuration file (its `[emergency] socket` is read from it).
    #[arg(
        long,
        short,
        conflicts_with = "socket",
        required_unless_present = "socket"
    )]
    pub(crate) config: Option<PathBuf>,
    /// Or the admin socket itself.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
}

const GRANT_EXAMPLES: &str = "Examples:
  # A clinician's viewer may read one study for 4 hours:
  transportd policy grant --emergency --config /etc/transportd/node.toml \\
      --peer spiffe://hospital.example/clinic/viewer --dataset ct-head \\
      --prefix case-2291/ --ttl 4h --reason \"INC-4711: stroke workup, PACS down\"
  transportd policy list-emergency --config /etc/transportd/node.toml
  transportd policy approve eg-3f9c0a1b2c3d --config /etc/transportd/node.toml   # a second operator
  transportd policy revoke-emergency eg-3f9c0a1b2c3d --config /etc/transportd/node.toml
  # What it did:
  transportd audit query /var/log/transportd/audit --event emergency_used --json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ActionArg {
    /// See a dataset and list its objects.
    List,
    /// Read objects.
    Read,
    /// Create or replace objects.
    Write,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify an audit trail: every record's hash link and sequence number, every signed
    /// checkpoint, and that nothing was cut off after the latest checkpoint. Reports the
    /// first broken record and exits 65 if there is one.
    Verify {
        /// The trail's directory.
        dir: PathBuf,
        /// Also check each checkpoint's signer against this trust bundle (and, with
        /// --witness, each countersigner's): `transportd issuer bundle --all`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Also compare the trail with what its witness holds: receipts (JSON lines) from
        /// `transportd issuer witness export --node ID`, or the node's own `witness.jsonl`.
        /// Every witnessed checkpoint must be in the trail, record for record: a trail
        /// rebuilt and signed again on the node fails, naming the seq.
        #[arg(long, value_name = "RECEIPTS")]
        witness: Option<PathBuf>,
        /// Or ask the running issuer for them, through its admin socket (on the issuer's
        /// host, as its user or root), for the node whose key signed the trail.
        #[arg(long, value_name = "ISSUER.TOML", conflicts_with = "witness")]
        witness_issuer: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an evidence report for a reviewer: one self-contained page (or JSON, or CSV)
    /// of what the trails of one or more nodes say, each trail verified first.
    ///
    /// The HTML page loads nothing from the network (a Content-Security-Policy forbids
    /// it) and holds: each trail's verification result, and its witness's where receipts
    /// are given (a trail that fails is marked FAILED with the first broken record, and its
    /// records are still shown); accesses by identity, dataset, data class and action;
    /// refusals with their reasons; identity events (issued, loaded, rotated, banned);
    /// policy loads with the lines that changed from the load before; transfers by path
    /// with bytes; and charts of decisions over time and bytes by path. Object names are
    /// left out (they can carry patient identifiers); `audit query` shows them.
    ///
    /// --dataset and --class narrow accesses, refusals of access and transfers; identity
    /// events, policy loads and refused connections are about no dataset and stay. A
    /// dataset's class is the one the node's policy declared when it decided the access.
    ///
    /// The report is written even when a trail fails; then the command exits 65.
    #[command(after_help = "Examples:
  transportd audit report /var/lib/transportd/audit --out report.html
  transportd audit report node1/audit node2/audit --from 7d --class phi --out phi.html
  transportd audit report audit --from 2026-11-01T00:00:00Z --to 2026-12-01T00:00:00Z \\
      --dataset ct-head --witness receipts.jsonl --bundle bundle.pem --out nov.html
  transportd audit report audit --format csv --out accesses.csv
  transportd audit report audit --format json | jq '.nodes[].verified'")]
    Report {
        /// The trails' directories, one per node.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// From this time on: RFC 3339 (2026-11-25T10:00:00Z) or an age (2h, 7d).
        #[arg(long)]
        from: Option<String>,
        /// Before this time: RFC 3339 or an age.
        #[arg(long)]
        to: Option<String>,
        /// Only accesses and transfers of this dataset.
        #[arg(long)]
        dataset: Option<String>,
        /// Only accesses and transfers of datasets of this data class.
        #[arg(long, value_enum)]
        class: Option<ClassArg>,
        /// Where to write the report (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// `html`: the page; `json`: the same data, for scripts; `csv`: one row per
        /// identity, dataset, class and action (identity, dataset, class, action, allowed,
        /// denied, first, last, nodes), for a spreadsheet.
        #[arg(long, value_enum, default_value = "html")]
        format: ReportFormat,
        /// Also check checkpoint signers (and witnesses) against this trust bundle
        /// (`transportd issuer bundle --all`).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Compare each trail with its witness's receipts (JSON lines from `transportd
        /// issuer witness export`; repeat, or give one file for all nodes): each trail is
        /// compared with the receipts naming the node that signed it.
        #[arg(long, value_name = "RECEIPTS")]
        witness: Vec<PathBuf>,
    },
    /// Print the records of a trail that match every filter given (it does not verify).
    Query {
        /// The trail's directory.
        dir: PathBuf,
        /// A peer's SPIFFE ID, or a prefix ending in `/`.
        #[arg(long)]
        peer: Option<String>,
        /// A dataset.
        #[arg(long)]
        dataset: Option<String>,
        /// An event kind: transfer, transfer_started, authorization, connection_accepted, ...
        #[arg(long)]
        event: Option<String>,
        /// From this time on: RFC 3339 (2026-11-25T10:00:00Z) or an age (2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Before this time: RFC 3339 or an age.
        #[arg(long)]
        until: Option<String>,
        /// Print JSON lines instead of a summary line per record.
        #[arg(long)]
        json: bool,
    },
}

/// A data class, as policies declare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ClassArg {
    /// Protected health information.
    Phi,
    /// De-identified data derived from PHI.
    Deidentified,
    /// Public data.
    Public,
}

/// What `audit report` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ReportFormat {
    /// One self-contained HTML page.
    Html,
    /// The report's data as one JSON object.
    Json,
    /// Access rows as CSV.
    Csv,
}

#[derive(Debug, Subcommand)]
pub(crate) enum WorkloadCommand {
    /// Fetch this process's X.509-SVIDs and trust bundle from the Workload API, like
    /// `spire-agent api fetch x509`: prints each SPIFFE ID, serial and expiry.
    ///
    /// The agent decides who you are from the kernel, not from anything you send: your
    /// user and group, and the executable (here: the transportd binary). Run it as the user
    /// a registration entry names (`unix:uid:1000`) to see what that workload receives.
    /// With --out, writes svid.pem, svid.key (mode 0600) and bundle.pem, the files
    /// `--identity DIR` of `ls`, `pull` and `push` reads. Exits 77 when the agent has no
    /// identity for you, 69 when nothing answers on the socket.
    Fetch {
        /// The Workload API socket: a path, or a `unix:///path` URI as the standard's
        /// variable holds it.
        #[arg(long, env = env::SPIFFE_ENDPOINT_SOCKET)]
        socket: String,
        /// Write svid.pem, svid.key and bundle.pem into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Which SVID to write when the agent issues several (default: its first).
        #[arg(long, requires = "out")]
        id: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How a client command reaches a node and proves who it is.
#[derive(Debug, Args)]
pub(crate) struct ConnArgs {
    /// The node, `HOST:PORT`. With --sidecar: which of the sidecar's storage nodes to ask
    /// (default: its first).
    #[arg(long, short = 'n', required_unless_present = "sidecar")]
    pub(crate) node: Option<String>,
    /// Go through this node's sidecar socket instead of connecting ourselves: the node
    /// attests this process (its uid and executable) and acts with that workload's SVID,
    /// fetching each object once for all its callers; no identity options are needed (nor
    /// used). Objects come as sealed memory files, not through the socket.
    #[arg(long, env = env::SIDECAR_SOCKET, value_name = "SOCKET")]
    pub(crate) sidecar: Option<PathBuf>,
    /// Directory holding svid.pem, svid.key and bundle.pem (as `ca issue` writes them).
    #[arg(long, env = env::IDENTITY_DIR)]
    pub(crate) identity: Option<PathBuf>,
    /// Our SVID certificate chain (PEM), overriding --identity.
    #[arg(long, env = env::SVID)]
    pub(crate) svid: Option<PathBuf>,
    /// Our SVID's private key (PEM), overriding --identity.
    #[arg(long, env = env::KEY)]
    pub(crate) key: Option<PathBuf>,
    /// The trust bundle to verify the node against, overriding --identity.
    #[arg(long, env = env::BUNDLE)]
    pub(crate) bundle: Option<PathBuf>,
    /// Take our identity from the SPIFFE Workload API at this socket (`unix:///path`), as
    /// served by a node's agent; used when no identity files are given. Rotations are
    /// followed while the command runs.
    #[arg(long, env = env::SPIFFE_ENDPOINT_SOCKET)]
    pub(crate) workload_socket: Option<String>,
    /// With the Workload API: use the SVID with this SPIFFE ID (default: the first offered).
    #[arg(long)]
    pub(crate) workload_id: Option<String>,
    /// Insist that the node presents this SPIFFE ID (default: any in the trust domain).
    #[arg(long)]
    pub(crate) server_id: Option<String>,
    /// Transport: QUIC, TLS over TCP, or QUIC falling back to TCP when UDP is blocked.
    #[arg(long, value_enum, default_value_t = PathArg::Auto)]
    pub(crate) path: PathArg,
    /// Longest silence a QUIC connection survives before it is given up as dead (and a
    /// transfer reconnects and resumes), e.g. `10s`; at least 5s. Match the node's
    /// `[limits] idle_timeout`.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub(crate) idle_timeout: humantime::Duration,
}

/// Options of pulls and pushes.
#[derive(Debug, Args)]
pub(crate) struct TransferArgs {
    /// Chunks in flight at once, each on its own stream.
    #[arg(long, default_value_t = 8)]
    pub(crate) parallel: u32,
    /// Reconnect attempts after a network failure before giving up.
    #[arg(long, default_value_t = 5)]
    pub(crate) retries: u32,
    /// Most payload bytes per second for each transfer, across its parallel chunks, e.g.
    /// `20MiB` (per second), so a bulk pull does not saturate a shared link. Default (or 0):
    /// unlimited. A paced pull moves by stream reads, not RDMA.
    #[arg(long, value_name = "RATE")]
    pub(crate) max_rate: Option<bytesize::ByteSize>,
    /// Connections to the node each object's chunks are striped over, for pulls and
    /// pushes (default: one per core of this machine, at most 4; never more than make two
    /// chunks each). The node records each object's transfer as one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) connections: Option<u32>,
    /// Keep this client's own audit trail (hash-chained, signed with its SVID) in this
    /// directory.
    #[arg(long)]
    pub(crate) audit: Option<PathBuf>,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Pulls by RDMA: `auto` uses an RDMA NIC when both sides have one (else QUIC, saying
    /// why once), `soft` the software device (labs and benchmarks), `off` never. RDMA chunks
    /// are sealed with AES-256-GCM under keys from this connection's TLS session.
    #[arg(long, value_enum, default_value_t = RdmaArg::Auto)]
    pub(crate) rdma: RdmaArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RdmaArg {
    /// An RDMA NIC when both sides have one, else QUIC.
    Auto,
    /// The software device.
    Soft,
    /// Never.
    Off,
}

impl From<RdmaArg> for libtransport::RdmaMode {
    fn from(a: RdmaArg) -> Self {
        match a {
            RdmaArg::Auto => Self::Auto,
            RdmaArg::Soft => Self::Soft,
            RdmaArg::Off => Self::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PathArg {
    /// QUIC, then TLS/TCP if QUIC gets no answer.
    Auto,
    /// QUIC with mutual TLS 1.3.
    Quic,
    /// TLS 1.3 over TCP.
    Tcp,
}
