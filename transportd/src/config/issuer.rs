//! The issuer's configuration file (`transportd issuer --config issuer.toml`): TOML,
//! unknown fields refused, every error naming its field. Parsing is pure: paths resolve
//! against the file's directory, and the passphrase's environment variable is looked up
//! through an injected function.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::TrustDomain;
use libtransport::audit::FileSinkConfig;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::ConfigError;

/// A validated issuer configuration.
#[derive(Debug)]
pub(crate) struct IssuerConfig {
    pub(crate) trust_domain: TrustDomain,
    /// Where node agents reach the issuer (TLS 1.3).
    pub(crate) listen: SocketAddr,
    /// The database and the CA keys.
    pub(crate) data_dir: PathBuf,
    /// The local socket `transportd issuer token|entry|ca|node` commands use.
    pub(crate) admin_socket: PathBuf,
    /// Lifetime of new CAs.
    pub(crate) ca_ttl: Duration,
    /// Where the first CA comes from: a `transportd ca init` directory, or generated.
    pub(crate) ca_import: Option<PathBuf>,
    pub(crate) passphrase: Passphrase,
    /// Lifetime of node and workload SVIDs (an entry may ask for less).
    pub(crate) svid_ttl: Duration,
    /// How often agents are told to sync (bundle, revocations, entries).
    pub(crate) sync_interval: Duration,
    pub(crate) audit: FileSinkConfig,
}

/// Where the CA keys' passphrase comes from; none keeps them unencrypted (mode 0600).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Passphrase {
    None,
    File(PathBuf),
    Env(String),
}

impl Passphrase {
    /// Reads the passphrase (trailing newline dropped).
    pub(crate) fn read(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, ConfigError> {
        let text = match self {
            Self::None => return Ok(None),
            Self::File(p) => Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                invalid(
                    "ca.passphrase_file",
                    &format!("cannot read {}: {e}", p.display()),
                )
            })?),
            Self::Env(var) => Zeroizing::new(env(var).ok_or_else(|| {
                invalid(
                    "ca.passphrase_env",
                    &format!("the environment variable {var} is not set"),
                )
            })?),
        };
        let pass = text.trim_end_matches(['\n', '\r']);
        if pass.is_empty() {
            return Err(invalid("ca", "the CA key passphrase is empty"));
        }
        Ok(Some(Zeroizing::new(pass.as_bytes().to_vec())))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    trust_domain: TrustDomain,
    listen: SocketAddr,
    data_dir: PathBuf,
    admin_socket: Option<PathBuf>,
    #[serde(default)]
    ca: CaFile,
    #[serde(default)]
    svid: SvidFile,
    audit: AuditFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaFile {
    #[serde(default, with = "super::file::humantime_serde_opt")]
    ttl: Option<Duration>,
    import: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    passphrase_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SvidFile {
    #[serde(default, with = "super::file::humantime_serde_opt")]
    ttl: Option<Duration>,
    #[serde(default, with = "super::file::humantime_serde_opt")]
    sync_interval: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    dir: PathBuf,
}

impl IssuerConfig {
    /// Reads and validates the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        super::load_with(path, Self::parse)
    }

    /// Parses TOML text; relative paths are relative to `base`. Pure.
    pub(crate) fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("issuer config"),
            message: e.to_string(),
        })?;
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let ca_ttl = f.ca.ttl.unwrap_or(DEFAULT_CA_TTL);
        if ca_ttl < Duration::from_secs(60) {
            return Err(invalid("ca.ttl", "must be at least 1m"));
        }
        let svid_ttl = f.svid.ttl.unwrap_or(certs::DEFAULT_SVID_TTL);
        if svid_ttl < Duration::from_secs(10) {
            return Err(invalid("svid.ttl", "must be at least 10s"));
        }
        certs::check_svid_ttl(svid_ttl, ca_ttl).map_err(|e| invalid("svid.ttl", &e.to_string()))?;
        let sync_interval = f.svid.sync_interval.unwrap_or(DEFAULT_SYNC_INTERVAL);
        if sync_interval < Duration::from_secs(1) || sync_interval > svid_ttl / 4 {
            return Err(invalid(
                "svid.sync_interval",
                &format!(
                    "must be between 1s and a quarter of svid.ttl ({})",
                    humantime::format_duration(svid_ttl / 4)
                ),
            ));
        }
        let passphrase = match (&f.ca.passphrase_file, &f.ca.passphrase_env) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "ca",
                    "give passphrase_file or passphrase_env, not both",
                ));
            }
            (Some(p), None) => Passphrase::File(abs(p)),
            (None, Some(v)) => {
                if v.is_empty() {
                    return Err(invalid("ca.passphrase_env", "name a variable"));
                }
                Passphrase::Env(v.clone())
            }
            (None, None) => Passphrase::None,
        };
        let data_dir = abs(&f.data_dir);
        let admin_socket = f
            .admin_socket
            .as_deref()
            .map_or_else(|| data_dir.join("admin.sock"), abs);
        Ok(Self {
            trust_domain: f.trust_domain,
            listen: f.listen,
            admin_socket,
            data_dir,
            ca_ttl,
            ca_import: f.ca.import.as_deref().map(abs),
            passphrase,
            svid_ttl,
            sync_interval,
            audit: FileSinkConfig::new(abs(&f.audit.dir)),
        })
    }

    /// The database file.
    pub(crate) fn db_path(&self) -> PathBuf {
        self.data_dir.join("state.db")
    }

    /// Where CA keys live.
    pub(crate) fn ca_dir(&self) -> PathBuf {
        self.data_dir.join("ca")
    }
}

/// An annotated example, printed by `transportd issuer example`.
pub(crate) const ISSUER_EXAMPLE: &str = r#"# transportd issuer configuration. Relative paths are relative to this file.
# The issuer holds the trust domain's CA key: run it on a machine of its own, not on a
# data node.

trust_domain = "hospital.example"
listen = "0.0.0.0:8443"            # node agents connect here (TLS 1.3)
data_dir = "/var/lib/transportd/issuer"   # state.db (tokens, entries, ledger) and ca/ keys
# admin_socket = "/var/lib/transportd/issuer/admin.sock"   # default: data_dir/admin.sock;
#                                   # `transportd issuer token|entry|ca|node` use it

[ca]
ttl = "365d"                       # lifetime of each CA; roll over before it ends
# import = "/etc/transportd/ca"    # take the first CA from `transportd ca init` (ca.pem, ca.key)
# passphrase_file = "/etc/transportd/ca-passphrase"   # encrypt CA keys at rest ...
# passphrase_env = "TRANSPORTD_CA_PASSPHRASE"          # ... or take it from the environment

[svid]
ttl = "1h"                         # node and workload SVIDs; at most ca.ttl / 6
sync_interval = "5s"               # how often nodes fetch the bundle and revocations

[audit]
dir = "/var/log/transportd/issuer-audit"   # every issuance, refusal and change
"#;

/// CA lifetime when the file does not say.
const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often agents sync when the file does not say: a ban reaches every node this fast.
const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);

fn invalid(field: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<IssuerConfig, ConfigError> {
        IssuerConfig::parse(text, Path::new("/etc/transportd"))
    }

    const MINIMAL: &str = r#"
trust_domain = "td.example"
listen = "127.0.0.1:8443"
data_dir = "issuer"
[audit]
dir = "audit"
"#;

    #[test]
    fn example_and_minimal_parse_with_defaults() {
        let c = parse(ISSUER_EXAMPLE).unwrap();
        assert_eq!(c.svid_ttl, Duration::from_secs(3600));
        assert_eq!(
            c.admin_socket,
            Path::new("/var/lib/transportd/issuer/admin.sock")
        );
        let m = parse(MINIMAL).unwrap();
        assert_eq!(m.data_dir, Path::new("/etc/transportd/issuer"));
        assert_eq!(m.db_path(), Path::new("/etc/transportd/issuer/state.db"));
        assert_eq!(m.passphrase, Passphrase::None);
        assert_eq!(m.sync_interval, DEFAULT_SYNC_INTERVAL);
    }

    #[test]
    fn an_svid_ttl_over_a_sixth_of_the_ca_ttl_is_refused() {
        let text = format!("{MINIMAL}\n[ca]\nttl = \"6h\"\n[svid]\nttl = \"1h1m\"\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("svid.ttl") && e.contains("divided by 6"),
            "{e}"
        );
        let ok = format!("{MINIMAL}\n[ca]\nttl = \"6h\"\n[svid]\nttl = \"1h\"\n");
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (MINIMAL.replace("td.example", "TD"), "trust_domain"),
            (format!("{MINIMAL}\n[svid]\nttl = \"1s\"\n"), "svid.ttl"),
            (
                format!("{MINIMAL}\n[svid]\nsync_interval = \"30m\"\n"),
                "svid.sync_interval",
            ),
            (
                format!("{MINIMAL}\n[ca]\npassphrase_file = \"a\"\npassphrase_env = \"B\"\n"),
                "ca",
            ),
        ];
        for (text, field) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let e = parse(&format!("{MINIMAL}\nlisten_tcp = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn the_passphrase_comes_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pass");
        std::fs::write(&file, "s3cret\n").unwrap();
        let none = |_: &str| None;
        let got = Passphrase::File(file).read(&none).unwrap().unwrap();
        assert_eq!(got.as_slice(), b"s3cret");
        let env = |v: &str| (v == "P").then(|| "from-env".to_owned());
        let got = Passphrase::Env("P".into()).read(&env).unwrap().unwrap();
        assert_eq!(got.as_slice(), b"from-env");
        assert!(Passphrase::Env("Q".into()).read(&env).is_err());
        assert!(Passphrase::None.read(&none).unwrap().is_none());
    }
}
