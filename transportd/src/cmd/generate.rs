//! `transportd generate`: shell completions (clap_complete) and man pages (clap_mangen),
//! both from the command line's own definition in `cli.rs`, so they never drift from it.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::Cli;

/// `generate completions SHELL`: the script on `out`.
pub(crate) fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_owned();
    // Into memory first: clap_complete panics on a failed write (a closed pipe), and a
    // write error here should be an error like any other.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("writing the completion script")
}

/// `generate man DIR`: `transportd.1` and one page per subcommand, at every depth
/// (`transportd-issuer-token-create.1`).
pub(crate) fn man(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let pages = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
        .count();
    eprintln!("{pages} man pages in {}", dir.display());
    Ok(())
}
