//! Helper process for the policy tests (`tests/service.rs`). Not a user tool.
//!
//! `duplex-datapath-probe --omit FILE:LINE`: the datapath service exactly as `duplex-datapath`
//! runs it, except that it enters the `datapath` seccomp policy without the rule at `FILE:LINE`
//! (the "every rule is needed" test: the service must then be killed by `SIGSYS`).
//! `--omit none` installs the whole policy the same way (the control run of that test).

use std::process::ExitCode;

use duplex_datapath::service;
use duplex_ipc::lifecycle;
use duplex_sandbox::Policy;

fn main() -> ExitCode {
    duplex_ipc::lifecycle::init_logging();
    lifecycle::abort_on_panic();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let omit = match args.as_slice() {
        [flag, none] if flag == "--omit" && none == "none" => Some(None),
        [flag, at] if flag == "--omit" => at
            .rsplit_once(':')
            .and_then(|(f, l)| Some(Some((f.to_owned(), l.parse::<usize>().ok()?)))),
        _ => None,
    };
    let Some(omit) = omit else {
        eprintln!("duplex-datapath-probe: usage: --omit FILE:LINE|none");
        return ExitCode::from(2);
    };
    let enter = || {
        Policy::for_service(service::SERVICE)
            .and_then(|p| match &omit {
                Some((file, line)) => p.without(file, *line),
                None => Ok(p),
            })
            .and_then(|p| p.compile())
            .and_then(|c| c.install())
    };
    match service::run(enter) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duplex-datapath-probe: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
