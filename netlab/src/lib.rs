//! netlab: separate hosts on one machine, for tests and benchmarks that loopback cannot
//! serve (a wire to sniff, links that drop, daemons that die).
//!
//! This is the skeleton the lab grows from: it checks the one precondition every lab has
//! (root, for network namespaces) and says plainly what is missing. Hosts, links, shaping,
//! faults and capture come with the lab's own issue.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Why a lab cannot be built here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// Network namespaces need root (or CAP_NET_ADMIN and CAP_SYS_ADMIN).
    #[error(
        "netlab needs root to create network namespaces (running as uid {uid}); run the lab tests as root, e.g. with sudo"
    )]
    NotRoot {
        /// The effective uid we run as.
        uid: u32,
    },
}

/// Checks that a lab can be built on this machine.
pub fn preflight() -> Result<(), LabError> {
    let uid = effective_uid();
    if uid == 0 {
        Ok(())
    } else {
        Err(LabError::NotRoot { uid })
    }
}

/// The effective uid, read from `/proc/self/status` (no unsafe call needed).
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_matches_the_uid() {
        let uid = effective_uid();
        assert_ne!(uid, u32::MAX, "uid readable from /proc");
        match preflight() {
            Ok(()) => assert_eq!(uid, 0),
            Err(LabError::NotRoot { uid: u }) => {
                assert_eq!(u, uid);
                assert!(
                    LabError::NotRoot { uid: u }
                        .to_string()
                        .contains("needs root")
                );
            }
        }
    }
}
