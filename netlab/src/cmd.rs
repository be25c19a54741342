//! Running the system tools the lab is built with (`ip`, `tc`, `nft`, `tcpdump`, `unshare`,
//! `nsenter`, `mount`): exit status checked, stderr kept for the error, and a missing tool
//! named together with the Debian package that ships it.
//!
//! Only the runner and its error live here; which commands to run is up to the modules that
//! know the concept (`link`, `shape`, `fault`, ...).

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// A system tool the lab shells out to could not be run, or reported failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CmdError {
    /// The program is not installed.
    #[error(
        "`{program}` not found: install the Debian package `{package}` (apt-get install -y {package})"
    )]
    NotFound {
        /// The program we tried to run.
        program: String,
        /// The Debian package that ships it.
        package: &'static str,
    },
    /// The program could not be started or talked to.
    #[error("could not run `{command}`: {source}")]
    Io {
        /// The command line.
        command: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it wrote to stderr (trimmed), which usually says what is wrong.
        stderr: String,
    },
}

/// Runs `program args...`, returns its stdout, or an error holding its stderr.
pub(crate) fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, CmdError> {
    run_with_stdin(program, args, None)
}

/// Runs `ip -n <netns> args...`: an `ip` command inside a network namespace.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String, CmdError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Runs a program inside a network namespace with `ip netns exec`.
pub(crate) fn exec_in(
    netns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CmdError> {
    let mut all = vec!["netns", "exec", netns, program];
    all.extend_from_slice(args);
    run_with_stdin("ip", &all, stdin)
}

/// Like [`run`], feeding `stdin` (if any) to the program.
pub(crate) fn run_with_stdin<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stdin: Option<&str>,
) -> Result<String, CmdError> {
    let mut command = Command::new(program);
    command.args(args);
    let output = output_of(&mut command, stdin)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a prepared command to completion, checking its exit status.
pub(crate) fn output_of(command: &mut Command, stdin: Option<&str>) -> Result<Output, CmdError> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(command)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| io_error(command, source))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| io_error(command, source))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(CmdError::Failed {
            command: describe(command),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Spawns a prepared command, naming the Debian package when the program is missing.
pub(crate) fn spawn(command: &mut Command) -> Result<std::process::Child, CmdError> {
    command.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            let program = command.get_program().to_string_lossy().into_owned();
            CmdError::NotFound {
                package: package_of(&program),
                program,
            }
        } else {
            io_error(command, source)
        }
    })
}

/// The command line, for messages.
pub(crate) fn describe(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn io_error(command: &Command, source: std::io::Error) -> CmdError {
    CmdError::Io {
        command: describe(command),
        source,
    }
}

/// The Debian package that ships a tool the lab uses.
pub(crate) fn package_of(program: &str) -> &'static str {
    match program.rsplit('/').next().unwrap_or(program) {
        "ip" | "tc" => "iproute2",
        "nft" => "nftables",
        "tcpdump" => "tcpdump",
        "ping" => "iputils-ping",
        "unshare" | "nsenter" => "util-linux",
        "mount" | "umount" => "mount",
        _ => "that provides it",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_their_package() {
        assert_eq!(package_of("/usr/sbin/nft"), "nftables");
        assert_eq!(package_of("tc"), "iproute2");
        let err = run("netlab-no-such-tool", &["x"]).unwrap_err();
        assert!(matches!(err, CmdError::NotFound { .. }), "{err}");
    }

    #[test]
    fn failures_carry_stderr() {
        let err = run("sh", &["-c", "echo broken >&2; exit 3"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("broken") && text.contains("sh -c"), "{text}");
        assert_eq!(run("sh", &["-c", "echo ok"]).unwrap(), "ok\n");
        assert_eq!(
            run_with_stdin("cat", &[] as &[&str], Some("fed")).unwrap(),
            "fed"
        );
    }
}
