//! Seccomp policies: the policy file format, its parser, and compilation to BPF.
//!
//! The format is described in `sandbox/policies/README.md`; in short:
//!
//! ```text
//! # A comment line.
//! @default kill_process                 # header: what happens to a syscall no rule allows
//! @include common                       # pull in the rules every service shares
//! read                                  # why this syscall is needed (mandatory)
//! mmap: arg2 & PROT_EXEC == 0           # argument pins, `&&` between several
//! clone3 -> errno ENOSYS                # answered with an errno instead of running
//! ```
//!
//! Each rule line must end with a `# why` comment. A syscall may have several conditional rules
//! (any one matching allows it) but no rule may repeat another or be shadowed by an
//! unconditional rule for the same syscall: every rule must be necessary, and the tests prove it
//! by removing each one in turn.

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::SandboxError;

/// Policies of services, as `(service, text)`: the names [`Policy::for_service`] accepts.
pub(crate) const SERVICES: &[(&str, &str)] = &[
    (
        "test-service",
        include_str!("../policies/test-service.policy"),
    ),
    ("mgmt", include_str!("../policies/mgmt.policy")),
    ("datapath", include_str!("../policies/datapath.policy")),
    ("fabric", include_str!("../policies/fabric.policy")),
    ("metadata", include_str!("../policies/metadata.policy")),
    ("cluster", include_str!("../policies/cluster.policy")),
    ("raid", include_str!("../policies/raid.policy")),
];

/// Policies that may only be included (`@include NAME`), as `(name, text)`.
pub(crate) const INCLUDES: &[(&str, &str)] =
    &[("common", include_str!("../policies/common.policy"))];

/// What the kernel does with a syscall that no rule allows (the policy's `@default` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchAction {
    /// `SECCOMP_RET_KILL_PROCESS` (`@default kill_process`, the default): the whole process dies
    /// at once with `SIGSYS`; nothing in the process can intercept it.
    KillProcess,
    /// `SECCOMP_RET_TRAP` (`@default trap`): `SIGSYS` is delivered to the offending thread with
    /// the syscall number in `si_syscall`. Unhandled, it also ends the process with `SIGSYS` (and a
    /// core dump where `RLIMIT_CORE` allows one); a service could install a handler to log the
    /// syscall first. Meant for developing a policy, not for production.
    Trap,
}

impl MismatchAction {
    fn seccomp_action(self) -> SeccompAction {
        match self {
            Self::KillProcess => SeccompAction::KillProcess,
            Self::Trap => SeccompAction::Trap,
        }
    }
}

/// What the kernel does with a syscall a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    /// The syscall runs.
    Allow,
    /// The syscall fails with this errno without running (`-> errno NAME`).
    Errno(u32),
}

/// How much of a syscall argument a condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgWidth {
    /// All 64 bits (`argN`).
    Qword,
    /// The low 32 bits only (`argN:32`), for `int` arguments whose upper half the kernel ignores.
    Dword,
}

/// A comparison operator of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `& MASK ==`: the masked bits equal the value.
    MaskedEq(u64),
}

/// One argument pin of a rule, such as `arg2 & PROT_EXEC == 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    arg: u8,
    width: ArgWidth,
    op: CmpOp,
    value: u64,
}

impl Condition {
    fn to_seccomp(&self) -> Result<SeccompCondition, seccompiler::BackendError> {
        let len = match self.width {
            ArgWidth::Qword => SeccompCmpArgLen::Qword,
            ArgWidth::Dword => SeccompCmpArgLen::Dword,
        };
        let op = match self.op {
            CmpOp::Eq => SeccompCmpOp::Eq,
            CmpOp::Ne => SeccompCmpOp::Ne,
            CmpOp::Lt => SeccompCmpOp::Lt,
            CmpOp::Le => SeccompCmpOp::Le,
            CmpOp::Gt => SeccompCmpOp::Gt,
            CmpOp::Ge => SeccompCmpOp::Ge,
            CmpOp::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
        };
        SeccompCondition::new(self.arg, len, op, self.value)
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "arg{}", self.arg)?;
        if self.width == ArgWidth::Dword {
            write!(f, ":32")?;
        }
        match self.op {
            CmpOp::Eq => write!(f, " == {:#x}", self.value),
            CmpOp::Ne => write!(f, " != {:#x}", self.value),
            CmpOp::Lt => write!(f, " < {:#x}", self.value),
            CmpOp::Le => write!(f, " <= {:#x}", self.value),
            CmpOp::Gt => write!(f, " > {:#x}", self.value),
            CmpOp::Ge => write!(f, " >= {:#x}", self.value),
            CmpOp::MaskedEq(mask) => write!(f, " & {mask:#x} == {:#x}", self.value),
        }
    }
}

/// One rule of a policy: a syscall, optional argument pins, an action and the reason it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    file: String,
    line: usize,
    syscall: String,
    nr: i64,
    conditions: Vec<Condition>,
    action: RuleAction,
    why: String,
}

impl Rule {
    /// The policy file the rule is written in, such as `common.policy`.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The 1-based line of the rule in [`Rule::file`].
    pub fn line(&self) -> usize {
        self.line
    }

    /// The syscall's name.
    pub fn syscall(&self) -> &str {
        &self.syscall
    }

    /// The argument pins; all must hold for the rule to match. Empty: any arguments.
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    /// What a match does.
    pub fn action(&self) -> RuleAction {
        self.action
    }

    /// The rule's comment: why the service needs it.
    pub fn why(&self) -> &str {
        &self.why
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.syscall)?;
        for (i, c) in self.conditions.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { " && " })?;
            write!(f, "{c}")?;
        }
        if let RuleAction::Errno(e) = self.action {
            write!(f, " -> errno {e}")?;
        }
        Ok(())
    }
}

/// A parsed seccomp policy: its rules (own and included, in file order) and mismatch action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    name: String,
    mismatch: MismatchAction,
    rules: Vec<Rule>,
}

impl Policy {
    /// The policy shipped for `service` (`sandbox/policies/<service>.policy`, embedded at build
    /// time).
    pub fn for_service(service: &str) -> Result<Self, SandboxError> {
        let text = SERVICES
            .iter()
            .find(|(name, _)| *name == service)
            .map(|(_, text)| *text)
            .ok_or_else(|| SandboxError::UnknownService(service.to_owned()))?;
        Self::parse(service, text)
    }

    /// The names of the services that have a policy.
    pub fn services() -> impl Iterator<Item = &'static str> {
        SERVICES.iter().map(|(name, _)| *name)
    }

    /// Parses policy text as if it were the file `<name>.policy`. `@include` resolves against
    /// the shipped includable policies (`common`).
    pub fn parse(name: &str, text: &str) -> Result<Self, SandboxError> {
        if !cfg!(target_arch = "x86_64") {
            return Err(SandboxError::UnsupportedArch(std::env::consts::ARCH));
        }
        let mut parser = Parser::default();
        parser.file(&format!("{name}.policy"), text, true)?;
        Ok(Self {
            name: name.to_owned(),
            mismatch: parser.mismatch.unwrap_or(MismatchAction::KillProcess),
            rules: parser.rules,
        })
    }

    /// The policy's name (the service's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What happens to a syscall no rule allows.
    pub fn mismatch_action(&self) -> MismatchAction {
        self.mismatch
    }

    /// All rules, included ones first where the `@include` stands first.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The same policy without the rule written at `file:line`: used by the tests that prove
    /// every rule is needed.
    pub fn without(&self, file: &str, line: usize) -> Result<Self, SandboxError> {
        let before = self.rules.len();
        let rules: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| !(r.file == file && r.line == line))
            .cloned()
            .collect();
        if rules.len() == before {
            return Err(SandboxError::NoSuchRule {
                file: file.to_owned(),
                line,
            });
        }
        Ok(Self {
            name: self.name.clone(),
            mismatch: self.mismatch,
            rules,
        })
    }

    /// Compiles the policy to BPF programs ready to install.
    ///
    /// The result is one program that allows every rule's syscall (errno rules included) and
    /// applies the mismatch action to everything else, plus one program per errno value that
    /// turns its rules' syscalls into that errno and allows everything else. The kernel runs all
    /// installed programs and takes the most severe answer, so an errno rule answers with its
    /// errno while anything unlisted is still killed.
    pub fn compile(&self) -> Result<CompiledPolicy, SandboxError> {
        let arch = target_arch()?;
        let compile_err = |source| SandboxError::Compile {
            policy: self.name.clone(),
            source,
        };
        let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let mut errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for rule in &self.rules {
            let seccomp_rule = if rule.conditions.is_empty() {
                None
            } else {
                let conds = rule
                    .conditions
                    .iter()
                    .map(Condition::to_seccomp)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(compile_err)?;
                Some(SeccompRule::new(conds).map_err(compile_err)?)
            };
            let mut targets = vec![allow.entry(rule.nr).or_default()];
            if let RuleAction::Errno(e) = rule.action {
                targets.push(errno.entry(e).or_default().entry(rule.nr).or_default());
            }
            // An empty rule vector means "any arguments"; the parser guarantees that a syscall
            // allowed unconditionally has no other rule that would make the vector non-empty.
            if let Some(r) = seccomp_rule {
                for t in targets {
                    t.push(r.clone());
                }
            }
        }
        let mut programs = Vec::with_capacity(1 + errno.len());
        for (e, rules) in errno {
            let filter =
                SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(e), arch)
                    .map_err(compile_err)?;
            programs.push(BpfProgram::try_from(filter).map_err(compile_err)?);
        }
        let filter = SeccompFilter::new(
            allow,
            self.mismatch.seccomp_action(),
            SeccompAction::Allow,
            arch,
        )
        .map_err(compile_err)?;
        // Installed last: once it is on, `seccomp` itself is no longer allowed.
        programs.push(BpfProgram::try_from(filter).map_err(compile_err)?);
        Ok(CompiledPolicy {
            name: self.name.clone(),
            programs,
        })
    }
}

/// A policy compiled to BPF, ready to install.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    name: String,
    programs: Vec<BpfProgram>,
}

impl CompiledPolicy {
    /// The number of BPF instructions over all programs.
    pub fn instructions(&self) -> usize {
        self.programs.iter().map(Vec::len).sum()
    }

    /// Sets `PR_SET_NO_NEW_PRIVS` and installs the programs on every thread of the calling
    /// process (`SECCOMP_FILTER_FLAG_TSYNC`). Irreversible.
    pub fn install(&self) -> Result<(), SandboxError> {
        crate::set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
        for program in &self.programs {
            seccompiler::apply_filter_all_threads(program).map_err(|source| {
                SandboxError::Install {
                    policy: self.name.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
fn target_arch() -> Result<seccompiler::TargetArch, SandboxError> {
    Ok(seccompiler::TargetArch::x86_64)
}

#[cfg(not(target_arch = "x86_64"))]
fn target_arch() -> Result<seccompiler::TargetArch, SandboxError> {
    Err(SandboxError::UnsupportedArch(std::env::consts::ARCH))
}

/// The x86_64 number of a syscall, by name.
#[cfg(target_arch = "x86_64")]
pub(crate) fn syscall_nr(name: &str) -> Option<i64> {
    let table = crate::syscalls_x86_64::SYSCALLS;
    table
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .and_then(|i| table.get(i))
        .map(|(_, nr)| *nr)
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn syscall_nr(_name: &str) -> Option<i64> {
    None
}

/// `FIONBIO` is a `c_ulong` on glibc but a `c_int` on musl.
#[allow(clippy::unnecessary_cast)]
const FIONBIO: u64 = libc::FIONBIO as u64;

/// Named values a condition or errno may use instead of a number.
const CONSTANTS: &[(&str, u64)] = &[
    ("AT_EMPTY_PATH", libc::AT_EMPTY_PATH as u64),
    ("CLONE_THREAD", libc::CLONE_THREAD as u64),
    ("EPOLL_CTL_ADD", libc::EPOLL_CTL_ADD as u64),
    ("EPOLL_CTL_DEL", libc::EPOLL_CTL_DEL as u64),
    ("F_DUPFD_CLOEXEC", libc::F_DUPFD_CLOEXEC as u64),
    ("F_GETFD", libc::F_GETFD as u64),
    ("F_GETFL", libc::F_GETFL as u64),
    ("F_GET_SEALS", libc::F_GET_SEALS as u64),
    ("F_SETFD", libc::F_SETFD as u64),
    ("F_SETFL", libc::F_SETFL as u64),
    ("FIONBIO", FIONBIO),
    ("MADV_DONTNEED", libc::MADV_DONTNEED as u64),
    ("MREMAP_MAYMOVE", libc::MREMAP_MAYMOVE as u64),
    ("PR_SET_NAME", libc::PR_SET_NAME as u64),
    ("PROT_EXEC", libc::PROT_EXEC as u64),
    ("PROT_READ", libc::PROT_READ as u64),
    ("PROT_WRITE", libc::PROT_WRITE as u64),
    ("SHUT_WR", libc::SHUT_WR as u64),
    ("SIGABRT", libc::SIGABRT as u64),
    ("SIG_BLOCK", libc::SIG_BLOCK as u64),
    ("SIG_SETMASK", libc::SIG_SETMASK as u64),
    ("SIG_UNBLOCK", libc::SIG_UNBLOCK as u64),
    ("SOCK_CLOEXEC", libc::SOCK_CLOEXEC as u64),
    ("SOCK_NONBLOCK", libc::SOCK_NONBLOCK as u64),
    ("SOL_SOCKET", libc::SOL_SOCKET as u64),
    ("SO_ACCEPTCONN", libc::SO_ACCEPTCONN as u64),
    ("SO_TYPE", libc::SO_TYPE as u64),
];

/// Errno names `-> errno NAME` accepts.
const ERRNOS: &[(&str, u32)] = &[
    ("EACCES", libc::EACCES as u32),
    ("EINVAL", libc::EINVAL as u32),
    ("ENOSYS", libc::ENOSYS as u32),
    ("EPERM", libc::EPERM as u32),
];

#[derive(Default)]
struct Parser {
    mismatch: Option<MismatchAction>,
    rules: Vec<Rule>,
}

impl Parser {
    fn file(&mut self, file: &str, text: &str, top: bool) -> Result<(), SandboxError> {
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |msg: String| SandboxError::Policy {
                file: file.to_owned(),
                line,
                msg,
            };
            let (body, comment) = match raw.split_once('#') {
                Some((b, c)) => (b.trim(), Some(c.trim())),
                None => (raw.trim(), None),
            };
            if body.is_empty() {
                continue;
            }
            if let Some(directive) = body.strip_prefix('@') {
                self.directive(directive, top).map_err(err)?;
                continue;
            }
            let why = match comment {
                Some(c) if !c.is_empty() => c.to_owned(),
                _ => {
                    return Err(err(
                        "rule has no `# why` comment; every rule must say why it is needed"
                            .to_owned(),
                    ))
                }
            };
            let rule = parse_rule(body, file, line, why).map_err(err)?;
            self.check_new(&rule).map_err(err)?;
            self.rules.push(rule);
        }
        Ok(())
    }

    fn directive(&mut self, directive: &str, top: bool) -> Result<(), String> {
        let mut words = directive.split_whitespace();
        let (Some(keyword), Some(arg), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "malformed directive `@{directive}`: expected `@default ACTION` or `@include NAME`"
            ));
        };
        if !top {
            return Err(format!(
                "`@{keyword}` is only allowed in a service's own policy, not in an included one"
            ));
        }
        match keyword {
            "default" => {
                if self.mismatch.is_some() {
                    return Err("a second `@default`".to_owned());
                }
                self.mismatch = Some(match arg {
                    "kill_process" => MismatchAction::KillProcess,
                    "trap" => MismatchAction::Trap,
                    other => {
                        return Err(format!(
                            "unknown default action `{other}`: expected `kill_process` or `trap`"
                        ))
                    }
                });
                Ok(())
            }
            "include" => {
                let text = INCLUDES
                    .iter()
                    .find(|(name, _)| *name == arg)
                    .map(|(_, text)| *text)
                    .ok_or_else(|| {
                        let known: Vec<&str> = INCLUDES.iter().map(|(n, _)| *n).collect();
                        format!("unknown include `{arg}` (known: {})", known.join(", "))
                    })?;
                if self.rules.iter().any(|r| r.file == format!("{arg}.policy")) {
                    return Err(format!("`{arg}` is included twice"));
                }
                self.file(&format!("{arg}.policy"), text, false)
                    .map_err(|e| e.to_string())
            }
            other => Err(format!(
                "unknown directive `@{other}`: expected `@default` or `@include`"
            )),
        }
    }

    /// Rejects a rule that repeats, or is shadowed by, or shadows, an earlier one.
    fn check_new(&self, rule: &Rule) -> Result<(), String> {
        for old in self.rules.iter().filter(|r| r.nr == rule.nr) {
            let at = format!("{}:{}", old.file, old.line);
            if old.action != rule.action {
                return Err(format!(
                    "`{}` has a different action at {at}; one syscall takes one action",
                    rule.syscall
                ));
            }
            if old.conditions == rule.conditions {
                return Err(format!("`{}` repeats the rule at {at}", rule.syscall));
            }
            if old.conditions.is_empty() {
                return Err(format!(
                    "`{}` is already allowed with any arguments at {at}; this rule is redundant",
                    rule.syscall
                ));
            }
            if rule.conditions.is_empty() {
                return Err(format!(
                    "`{}` with any arguments makes the pinned rule at {at} redundant",
                    rule.syscall
                ));
            }
        }
        Ok(())
    }
}

fn parse_rule(body: &str, file: &str, line: usize, why: String) -> Result<Rule, String> {
    let (body, action) = match body.split_once("->") {
        Some((b, a)) => (b.trim(), parse_action(a.trim())?),
        None => (body, RuleAction::Allow),
    };
    let (name, conds) = match body.split_once(':') {
        Some((n, c)) => (n.trim(), Some(c.trim())),
        None => (body.trim(), None),
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "`{name}` is not a syscall name; expected `NAME [: CONDITIONS] [-> errno E]  # why`"
        ));
    }
    let nr = syscall_nr(name).ok_or_else(|| format!("unknown syscall `{name}`"))?;
    let mut conditions = Vec::new();
    if let Some(conds) = conds {
        for cond in conds.split("&&") {
            conditions.push(parse_condition(cond.trim())?);
        }
    }
    Ok(Rule {
        file: file.to_owned(),
        line,
        syscall: name.to_owned(),
        nr,
        conditions,
        action,
        why,
    })
}

fn parse_action(text: &str) -> Result<RuleAction, String> {
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("errno"), Some(e), None) => {
            let value = match ERRNOS.iter().find(|(n, _)| *n == e) {
                Some((_, v)) => *v,
                None => e.parse::<u32>().map_err(|_| {
                    format!(
                        "unknown errno `{e}`: use a number or one of {}",
                        errno_names()
                    )
                })?,
            };
            if value == 0 || value > 4095 {
                return Err(format!("errno {value} is out of range 1..=4095"));
            }
            Ok(RuleAction::Errno(value))
        }
        _ => Err(format!(
            "malformed action `-> {text}`: the only action is `-> errno NAME`"
        )),
    }
}

fn errno_names() -> String {
    ERRNOS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_condition(text: &str) -> Result<Condition, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let malformed = || {
        format!(
            "malformed condition `{text}`: expected `argN OP VALUE` or `argN & MASK == VALUE` \
             (N in 0..=5, `argN:32` for the low 32 bits, OP one of == != < <= > >=, words \
             separated by spaces)"
        )
    };
    let (arg, op, value) = match words.as_slice() {
        [arg, "&", mask, "==", value] => (*arg, CmpOp::MaskedEq(parse_value(mask)?), *value),
        [arg, op, value] => {
            let op = match *op {
                "==" => CmpOp::Eq,
                "!=" => CmpOp::Ne,
                "<" => CmpOp::Lt,
                "<=" => CmpOp::Le,
                ">" => CmpOp::Gt,
                ">=" => CmpOp::Ge,
                _ => return Err(malformed()),
            };
            (*arg, op, *value)
        }
        _ => return Err(malformed()),
    };
    let (arg, width) = match arg.strip_suffix(":32") {
        Some(a) => (a, ArgWidth::Dword),
        None => (arg, ArgWidth::Qword),
    };
    let arg = arg
        .strip_prefix("arg")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| *n <= 5)
        .ok_or_else(malformed)?;
    let value = parse_value(value)?;
    if width == ArgWidth::Dword {
        let too_wide = |v: u64| v > u64::from(u32::MAX);
        if too_wide(value) || matches!(op, CmpOp::MaskedEq(m) if too_wide(m)) {
            return Err(format!("`{text}` compares 32 bits with a wider value"));
        }
    }
    Ok(Condition {
        arg,
        width,
        op,
        value,
    })
}

/// A number (decimal or `0x` hex) or a named constant, or several joined by `|`.
fn parse_value(text: &str) -> Result<u64, String> {
    let mut value = 0u64;
    for part in text.split('|') {
        let part = part.trim();
        let v = if let Some(hex) = part.strip_prefix("0x") {
            u64::from_str_radix(hex, 16).ok()
        } else if part.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
            part.parse::<u64>().ok()
        } else {
            CONSTANTS.iter().find(|(n, _)| *n == part).map(|(_, v)| *v)
        };
        value |= v.ok_or_else(|| {
            format!(
                "`{part}` is neither a number nor a known constant (see CONSTANTS in policy.rs)"
            )
        })?;
    }
    Ok(value)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, SandboxError> {
        Policy::parse("t", text)
    }

    fn err_of(text: &str) -> String {
        match parse(text) {
            Ok(p) => panic!("parsed: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_shipped_policy_parses_and_compiles() {
        assert!(Policy::services().count() > 0);
        for service in Policy::services() {
            let policy = match Policy::for_service(service) {
                Ok(p) => p,
                Err(e) => panic!("{service}: {e}"),
            };
            assert!(!policy.rules().is_empty());
            assert!(
                policy.rules().iter().any(|r| r.file() == "common.policy"),
                "{service} does not include common"
            );
            for rule in policy.rules() {
                assert!(!rule.why().is_empty(), "{rule}");
                assert_eq!(syscall_nr(rule.syscall()), Some(rule.nr), "{rule}");
            }
            if let Err(e) = policy.compile() {
                panic!("{service}: {e}");
            }
        }
        // An include alone parses too (no service policy may hide its errors).
        for (name, text) in INCLUDES {
            if let Err(e) = Parser::default().file(name, text, false) {
                panic!("{name}: {e}");
            }
        }
    }

    #[test]
    fn syscall_table_is_sorted_and_real() {
        let t = crate::syscalls_x86_64::SYSCALLS;
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "table not sorted");
        assert_eq!(syscall_nr("read"), Some(0));
        assert_eq!(syscall_nr("execve"), Some(59));
        assert_eq!(syscall_nr("exit_group"), Some(231));
        assert_eq!(syscall_nr("opne"), None);
    }

    #[test]
    fn rules_conditions_and_actions_parse() {
        let p = match parse(
            "@default trap\n\
             # a comment line\n\
             \n\
             read   # why\n\
             mmap: arg2 & PROT_EXEC == 0 && arg3:32 != 0x10   # why\n\
             fcntl: arg1 == F_GETFL # a\n\
             fcntl: arg1 == F_SETFL|4 # b\n\
             clone3 -> errno ENOSYS # c\n",
        ) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.mismatch_action(), MismatchAction::Trap);
        let r = p.rules();
        assert_eq!(r.len(), 5);
        assert_eq!((r[0].syscall(), r[0].line()), ("read", 4));
        assert_eq!(r[0].conditions(), &[]);
        assert_eq!(
            r[1].conditions(),
            &[
                Condition {
                    arg: 2,
                    width: ArgWidth::Qword,
                    op: CmpOp::MaskedEq(4),
                    value: 0
                },
                Condition {
                    arg: 3,
                    width: ArgWidth::Dword,
                    op: CmpOp::Ne,
                    value: 16
                }
            ]
        );
        assert_eq!(r[3].conditions()[0].value, libc::F_SETFL as u64 | 4);
        assert_eq!(r[4].action(), RuleAction::Errno(libc::ENOSYS as u32));
        assert_eq!(
            r[1].to_string(),
            "t.policy:5: mmap: arg2 & 0x4 == 0x0 && arg3:32 != 0x10"
        );
        assert!(p.compile().is_ok());
        // Default action when there is no header.
        assert_eq!(
            parse("read # x").map(|p| p.mismatch_action()).ok(),
            Some(MismatchAction::KillProcess)
        );
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "read # ok\nopne # typo",
                "t.policy:2: unknown syscall `opne`",
            ),
            (
                "read # ok\n\nwrite\n",
                "t.policy:3: rule has no `# why` comment",
            ),
            ("write #   \n", "t.policy:1: rule has no `# why` comment"),
            (
                "mmap: arg7 == 1 # x",
                "t.policy:1: malformed condition `arg7 == 1`",
            ),
            ("mmap: arg1 =! 1 # x", "t.policy:1: malformed condition"),
            (
                "mmap: arg1 == PROT_EXCE # x",
                "t.policy:1: `PROT_EXCE` is neither",
            ),
            (
                "mmap: arg1:32 == 0x100000000 # x",
                "compares 32 bits with a wider value",
            ),
            ("mmap: # x", "t.policy:1: malformed condition ``"),
            (
                "clone3 -> errno ENOSIS # x",
                "t.policy:1: unknown errno `ENOSIS`",
            ),
            ("clone3 -> allow # x", "the only action is `-> errno NAME`"),
            (
                "read # a\nread # b",
                "t.policy:2: `read` repeats the rule at t.policy:1",
            ),
            (
                "read # a\nread: arg0 == 1 # b",
                "t.policy:2: `read` is already allowed",
            ),
            (
                "read: arg0 == 1 # a\nread # b",
                "makes the pinned rule at t.policy:1 redundant",
            ),
            (
                "read # a\nread -> errno EPERM # b",
                "has a different action at t.policy:1",
            ),
            (
                "@default allow",
                "t.policy:1: unknown default action `allow`",
            ),
            (
                "@default trap\n@default trap",
                "t.policy:2: a second `@default`",
            ),
            ("@include nothing", "t.policy:1: unknown include `nothing`"),
            (
                "@include common\n@include common",
                "t.policy:2: `common` is included twice",
            ),
            ("@frobnicate x", "unknown directive `@frobnicate`"),
            ("@include", "t.policy:1: malformed directive"),
            ("read write # x", "`read write` is not a syscall name"),
        ];
        for (text, want) in cases {
            let got = err_of(text);
            assert!(got.contains(want), "{text:?}: got {got:?}, want {want:?}");
        }
        // A rule in the included file that clashes names the including line's rule.
        let got = err_of("@include common\nexit_group # again");
        assert!(got.starts_with("t.policy:2: `exit_group` repeats the rule at common.policy:"));
    }

    #[test]
    fn without_removes_exactly_one_rule() {
        let p = match parse("read # a\nwrite # b") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let q = match p.without("t.policy", 2) {
            Ok(q) => q,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(q.rules().len(), 1);
        assert_eq!(q.rules()[0].syscall(), "read");
        assert!(p.without("t.policy", 3).is_err());
    }

    #[test]
    fn errno_rules_compile_to_a_separate_program() {
        let one = match parse("read # a").and_then(|p| p.compile()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let two = match parse("read # a\nclone3 -> errno ENOSYS # b").and_then(|p| p.compile()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(one.programs.len(), 1);
        assert_eq!(two.programs.len(), 2);
    }
}
