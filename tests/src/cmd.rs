//! Running the networking tools (`ip`, `bridge`, `iptables`, `sysctl`, `ping`) with errors that show the
//! command line and its stderr.

use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};

/// Runs `program args…`, returns its stdout; a non-zero exit is an error naming the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = output(program, args)?;
    if !out.status.success() {
        return Err(failure(program, args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` and returns its whole output, whatever the exit status.
pub fn output(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            Error::msg(format!(
                "cannot run `{}`: {e} (is it installed? scripts/install-deps.sh installs it)",
                command_line(program, args)
            ))
        })
}

/// The error for a command that exited with a failure.
pub fn failure(program: &str, args: &[&str], out: &Output) -> Error {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let detail = if stderr.trim().is_empty() {
        stdout.trim().to_owned()
    } else {
        stderr.trim().to_owned()
    };
    Error::msg(format!(
        "`{}` failed ({}): {detail}",
        command_line(program, args),
        out.status
    ))
}

/// The command as one would type it.
pub fn command_line(program: &str, args: &[&str]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Splits a command line on whitespace (the harness's own commands have no quoting).
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}
