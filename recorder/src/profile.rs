//! Merging the recorder's seccomp rules into a container's OCI `linux.seccomp` profile.
//!
//! The recorder relies on `SCMP_ACT_TRACE` for every syscall in [`crate::syscalls::TRACED`]:
//! runc installs the merged profile as the last step before exec, so the container's first
//! instruction already runs under it. The container's own profile keeps its meaning:
//!
//! * a call the profile **denies** (`SCMP_ACT_ERRNO`, `SCMP_ACT_KILL*`, `SCMP_ACT_TRAP`) is
//!   still denied, with the same action and errno: denial wins over tracing;
//! * a call the profile **allows** (`SCMP_ACT_ALLOW`, `SCMP_ACT_LOG`, or no profile at all) is
//!   traced instead (`SCMP_ACT_TRACE` lets the call run once the tracer resumes it);
//! * a call the profile sends to a seccomp agent (`SCMP_ACT_NOTIFY`) is left to the agent and
//!   reported as untraced.
//!
//! The merge changes rules in place, `ALLOW`/`LOG` → `TRACE`, keeping each rule's argument
//! conditions, and splits a syscall out of a multi-name rule when only it changes; so whatever
//! the profile's rule structure selects, it selects the same calls afterwards. The one case
//! that needs new conditions is a syscall the profile allows by default but denies for some
//! argument values: the traced rule then needs the complement of those conditions, which is
//! expressible for single `==`, `!=`, `<`, `<=`, `>`, `>=` comparisons on distinct arguments;
//! otherwise (`SCMP_CMP_MASKED_EQ`, multi-comparison denials) the syscall stays untraced and is
//! reported in [`Merged::untraced`], never silently.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction as Action, LinuxSeccompArg, LinuxSeccompOperator as Op,
    LinuxSyscall,
};

/// The merged profile and what happened to each of the recorder's syscalls.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The profile to put into the OCI spec's `linux.seccomp`.
    pub profile: LinuxSeccomp,
    /// Syscalls traced for every argument value the container's profile allows.
    pub traced: Vec<String>,
    /// Syscalls the container's profile denies outright: still denied, not traced.
    pub denied: Vec<String>,
    /// Syscalls traced for some argument values and denied for the others, as the profile says.
    pub partly_traced: Vec<String>,
    /// Syscalls the profile allows at least sometimes but the merge could not trace, and why.
    /// The recorder's record is incomplete for these; the caller must report it.
    pub untraced: Vec<(String, String)>,
}

/// Errors of profile merging.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The profile could not be built.
    #[error("building the seccomp profile: {0}")]
    Build(#[from] oci_spec::OciSpecError),
}

/// True for the actions that refuse a call.
pub fn is_denial(a: Action) -> bool {
    matches!(
        a,
        Action::ScmpActKill
            | Action::ScmpActKillThread
            | Action::ScmpActKillProcess
            | Action::ScmpActTrap
            | Action::ScmpActErrno
    )
}

/// The kernel's precedence among seccomp return actions (higher wins when several filters or
/// rules apply).
pub fn precedence(a: Action) -> u8 {
    match a {
        Action::ScmpActKillProcess => 8,
        Action::ScmpActKill | Action::ScmpActKillThread => 7,
        Action::ScmpActTrap => 6,
        Action::ScmpActErrno => 5,
        Action::ScmpActNotify => 4,
        Action::ScmpActTrace => 3,
        Action::ScmpActLog => 2,
        Action::ScmpActAllow => 1,
    }
}

fn allows(a: Action) -> bool {
    matches!(a, Action::ScmpActAllow | Action::ScmpActLog)
}

fn has_args(rule: &LinuxSyscall) -> bool {
    rule.args().as_ref().is_some_and(|a| !a.is_empty())
}

/// Merges the recorder's syscalls ([`crate::syscalls::traced_names`]) into `container`'s
/// profile (`None`: the container has none).
pub fn merge(container: Option<&LinuxSeccomp>) -> Result<Merged, ProfileError> {
    merge_names(container, &crate::syscalls::traced_names())
}

/// [`merge`] with an explicit list of syscall names.
pub fn merge_names(
    container: Option<&LinuxSeccomp>,
    names: &[&str],
) -> Result<Merged, ProfileError> {
    let mut profile = match container {
        Some(p) => p.clone(),
        None => {
            let mut p = LinuxSeccomp::default();
            p.set_default_action(Action::ScmpActAllow);
            // Without a profile every ABI was allowed; keep the 32-bit ABIs allowed (their
            // syscall numbers differ; the recorder reports the ones it sees as unrecordable).
            p.set_architectures(Some(vec![
                Arch::ScmpArchX86_64,
                Arch::ScmpArchX86,
                Arch::ScmpArchX32,
            ]));
            p
        }
    };
    let default = profile.default_action();
    let mut rules: Vec<LinuxSyscall> = profile.syscalls().clone().unwrap_or_default();
    let mut merged = Merged {
        profile: LinuxSeccomp::default(),
        traced: Vec::new(),
        denied: Vec::new(),
        partly_traced: Vec::new(),
        untraced: Vec::new(),
    };
    let mut plain_trace: Vec<String> = Vec::new();

    for &name in names {
        let named: Vec<usize> = (0..rules.len())
            .filter(|&i| rules[i].names().iter().any(|n| n == name))
            .collect();
        let (cond, uncond): (Vec<usize>, Vec<usize>) =
            named.iter().partition(|&&i| has_args(&rules[i]));
        let base_rule = uncond
            .iter()
            .map(|&i| rules[i].action())
            .max_by_key(|&a| precedence(a));
        let base = base_rule.unwrap_or(default);
        let cond_allow: Vec<usize> = cond
            .iter()
            .copied()
            .filter(|&i| allows(rules[i].action()))
            .collect();
        let cond_other: Vec<usize> = cond
            .iter()
            .copied()
            .filter(|&i| !allows(rules[i].action()) && rules[i].action() != Action::ScmpActTrace)
            .collect();
        // Conditional allows become conditional traces, whatever the base.
        for &i in cond_allow.iter().rev() {
            retarget(&mut rules, i, name, Action::ScmpActTrace);
        }

        if is_denial(base) {
            if cond_allow.is_empty()
                && !cond
                    .iter()
                    .any(|&i| rules[i].action() == Action::ScmpActTrace)
            {
                merged.denied.push(name.to_string());
            } else {
                merged.partly_traced.push(name.to_string());
            }
            continue;
        }
        match base {
            Action::ScmpActNotify => {
                merged.untraced.push((
                    name.to_string(),
                    "the container's profile sends it to a seccomp agent (SCMP_ACT_NOTIFY)".into(),
                ));
                continue;
            }
            Action::ScmpActTrace => {}
            _ if base_rule.is_some() => {
                // An unconditional allow rule: trace it in place; conditional denials, if any,
                // keep whatever precedence the rule structure gave them.
                for &i in uncond.iter().rev() {
                    if allows(rules[i].action()) {
                        retarget(&mut rules, i, name, Action::ScmpActTrace);
                    }
                }
            }
            _ if cond_other.is_empty() => plain_trace.push(name.to_string()),
            _ => match complement(&rules, &cond_other) {
                Some(args) => {
                    let rule = oci_spec::runtime::LinuxSyscallBuilder::default()
                        .names(vec![name.to_string()])
                        .action(Action::ScmpActTrace)
                        .args(args)
                        .build()?;
                    rules.push(rule);
                }
                None => {
                    merged.untraced.push((
                        name.to_string(),
                        "allowed by default but denied for some argument values by conditions \
                         whose complement one seccomp rule cannot express"
                            .into(),
                    ));
                    continue;
                }
            },
        }
        if cond_other.is_empty() {
            merged.traced.push(name.to_string());
        } else {
            merged.partly_traced.push(name.to_string());
        }
    }
    if !plain_trace.is_empty() {
        rules.push(
            oci_spec::runtime::LinuxSyscallBuilder::default()
                .names(plain_trace)
                .action(Action::ScmpActTrace)
                .build()?,
        );
    }
    profile.set_syscalls(Some(rules));
    merged.profile = profile;
    Ok(merged)
}

/// Gives `name` the action `action` in rule `i`, splitting it out of a multi-name rule.
fn retarget(rules: &mut Vec<LinuxSyscall>, i: usize, name: &str, action: Action) {
    let Some(rule) = rules.get_mut(i) else {
        return;
    };
    if rule.names().len() == 1 {
        rule.set_action(action);
        rule.set_errno_ret(None);
        return;
    }
    let mut split = rule.clone();
    let rest: Vec<String> = rule
        .names()
        .iter()
        .filter(|n| *n != name)
        .cloned()
        .collect();
    rule.set_names(rest);
    split.set_names(vec![name.to_string()]);
    split.set_action(action);
    split.set_errno_ret(None);
    rules.push(split);
}

/// The conjunction of the negations of rules `deny` (each a single comparison, on distinct
/// argument indices), or `None` if that is not expressible as one rule.
fn complement(rules: &[LinuxSyscall], deny: &[usize]) -> Option<Vec<LinuxSeccompArg>> {
    let mut out: Vec<LinuxSeccompArg> = Vec::new();
    for &i in deny {
        let args = rules.get(i)?.args().as_ref()?;
        let [arg] = args.as_slice() else {
            return None;
        };
        let neg = match arg.op() {
            Op::ScmpCmpEq => Op::ScmpCmpNe,
            Op::ScmpCmpNe => Op::ScmpCmpEq,
            Op::ScmpCmpLt => Op::ScmpCmpGe,
            Op::ScmpCmpGe => Op::ScmpCmpLt,
            Op::ScmpCmpLe => Op::ScmpCmpGt,
            Op::ScmpCmpGt => Op::ScmpCmpLe,
            Op::ScmpCmpMaskedEq => return None,
        };
        if out.iter().any(|a| a.index() == arg.index()) {
            return None;
        }
        let a = oci_spec::runtime::LinuxSeccompArgBuilder::default()
            .index(arg.index())
            .value(arg.value())
            .op(neg)
            .build()
            .ok()?;
        out.push(a);
    }
    Some(out)
}

/// What `profile` does with syscall `name` called with `args`, as a model of runc + libseccomp +
/// the kernel: the highest-precedence action among the matching rules, else the default.
pub fn evaluate(profile: &LinuxSeccomp, name: &str, args: &[u64; 6]) -> Action {
    let matching = profile
        .syscalls()
        .iter()
        .flatten()
        .filter(|r| r.names().iter().any(|n| n == name))
        .filter(|r| {
            r.args()
                .iter()
                .flatten()
                .all(|c| args.get(c.index()).is_some_and(|&v| compare(c, v)))
        })
        .map(|r| r.action())
        .max_by_key(|&a| precedence(a));
    matching.unwrap_or(profile.default_action())
}

fn compare(c: &LinuxSeccompArg, v: u64) -> bool {
    let k = c.value();
    match c.op() {
        Op::ScmpCmpNe => v != k,
        Op::ScmpCmpLt => v < k,
        Op::ScmpCmpLe => v <= k,
        Op::ScmpCmpEq => v == k,
        Op::ScmpCmpGe => v >= k,
        Op::ScmpCmpGt => v > k,
        Op::ScmpCmpMaskedEq => v & k == c.value_two().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A condensed Docker default profile (moby's `default.json` as runc receives it): deny by
    /// default with EPERM, a long allow list, `clone` allowed only without namespace flags,
    /// `clone3` refused with ENOSYS so that libc falls back to `clone`, `personality` allowed
    /// for a few values.
    const DOCKER_LIKE: &str = r#"{
      "defaultAction": "SCMP_ACT_ERRNO",
      "defaultErrnoRet": 1,
      "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
      "syscalls": [
        {"names": ["accept", "accept4", "brk", "clock_gettime", "clock_nanosleep", "close",
                   "connect", "epoll_pwait", "epoll_wait", "execve", "execveat", "exit",
                   "exit_group", "fork", "futex", "getcpu", "getitimer", "getrusage",
                   "getsockopt", "gettimeofday", "mmap", "nanosleep", "openat", "poll",
                   "ppoll", "pread64", "preadv", "preadv2", "pselect6", "read", "readv",
                   "recvfrom", "recvmmsg", "recvmsg", "rt_sigreturn", "rt_sigtimedwait",
                   "sched_yield", "select", "socket", "sysinfo", "time", "timer_gettime",
                   "timerfd_gettime", "times", "vfork", "wait4", "waitid", "write",
                   "getrandom", "epoll_pwait2", "futex_waitv", "msgrcv"],
         "action": "SCMP_ACT_ALLOW"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
        {"names": ["io_uring_setup", "io_uring_enter"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        {"names": ["kexec_load"], "action": "SCMP_ACT_KILL_PROCESS"}
      ]
    }"#;

    fn docker() -> LinuxSeccomp {
        serde_json::from_str(DOCKER_LIKE).expect("profile parses")
    }

    const SAMPLES: &[[u64; 6]] = &[
        [0; 6],
        [1, 2, 3, 4, 5, 6],
        [0x3d0f00, 0, 0, 0, 0, 0],           // thread clone flags
        [0x1000_0000 | 0x11, 0, 0, 0, 0, 0], // CLONE_NEWUSER
        [0x800, 0x800, 0x800, 0x800, 0, 0],
        [40, 1, 0, 0x80000, 0, 0],
        [u64::MAX, u64::MAX, 0, 0, 0, 0],
    ];

    /// The property the merge promises, checked over every traced name and sample arguments:
    /// denials unchanged, allows become traces unless reported untraced, other syscalls
    /// unchanged.
    fn check_property(orig: &LinuxSeccomp, m: &Merged) {
        let untraced: Vec<&str> = m.untraced.iter().map(|(n, _)| n.as_str()).collect();
        for name in crate::syscalls::traced_names() {
            for args in SAMPLES {
                let before = evaluate(orig, name, args);
                let after = evaluate(&m.profile, name, args);
                if is_denial(before) {
                    assert_eq!(after, before, "{name} {args:?}: a denial must stay");
                } else if allows(before) && !untraced.contains(&name) {
                    assert_eq!(
                        after,
                        Action::ScmpActTrace,
                        "{name} {args:?} must be traced"
                    );
                } else if !allows(before) {
                    assert_eq!(after, before, "{name} {args:?}");
                }
            }
        }
        for name in [
            "write",
            "socket",
            "close",
            "kexec_load",
            "personality",
            "openat",
        ] {
            for args in SAMPLES {
                assert_eq!(
                    evaluate(orig, name, args),
                    evaluate(&m.profile, name, args),
                    "{name} {args:?} is not the recorder's business"
                );
            }
        }
        // Every traced name is reported exactly once.
        for name in crate::syscalls::traced_names() {
            let n = m.traced.iter().filter(|n| *n == name).count()
                + m.denied.iter().filter(|n| *n == name).count()
                + m.partly_traced.iter().filter(|n| *n == name).count()
                + untraced.iter().filter(|n| **n == name).count();
            assert_eq!(n, 1, "{name} reported {n} times");
        }
    }

    #[test]
    fn docker_default_like_profile() {
        let orig = docker();
        let m = merge(Some(&orig)).expect("merge");
        check_property(&orig, &m);
        let z = [0u64; 6];
        assert_eq!(evaluate(&m.profile, "read", &z), Action::ScmpActTrace);
        assert_eq!(evaluate(&m.profile, "write", &z), Action::ScmpActAllow);
        assert_eq!(evaluate(&m.profile, "getrandom", &z), Action::ScmpActTrace);
        // clone3 keeps ENOSYS, io_uring keeps EPERM.
        assert_eq!(evaluate(&m.profile, "clone3", &z), Action::ScmpActErrno);
        assert!(m.denied.iter().any(|n| n == "clone3"));
        assert!(m.denied.iter().any(|n| n == "io_uring_setup"));
        let clone3 = m
            .profile
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names().iter().any(|n| n == "clone3"))
            .expect("clone3 rule");
        assert_eq!(clone3.errno_ret(), Some(38));
        // clone: traced without namespace flags, denied with them.
        assert_eq!(
            evaluate(&m.profile, "clone", &[0x3d0f00, 0, 0, 0, 0, 0]),
            Action::ScmpActTrace
        );
        assert_eq!(
            evaluate(&m.profile, "clone", &[0x1000_0000, 0, 0, 0, 0, 0]),
            Action::ScmpActErrno
        );
        assert!(m.partly_traced.iter().any(|n| n == "clone"));
        assert!(m.untraced.is_empty(), "{:?}", m.untraced);
        // The allow rule lost exactly the traced names and kept the others.
        let allow = m
            .profile
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.action() == Action::ScmpActAllow && r.names().iter().any(|n| n == "write"))
            .expect("allow rule");
        assert!(allow.names().iter().any(|n| n == "mmap"));
        assert!(!allow.names().iter().any(|n| n == "read"));
        // Untouched attributes.
        assert_eq!(m.profile.default_errno_ret(), Some(1));
        assert_eq!(m.profile.architectures(), orig.architectures());
    }

    #[test]
    fn serialised_profile_says_scmp_act_trace() {
        let m = merge(Some(&docker())).expect("merge");
        let json = serde_json::to_value(&m.profile).expect("json");
        let rules = json["syscalls"].as_array().expect("syscalls");
        let read = rules
            .iter()
            .find(|r| r["names"] == serde_json::json!(["read"]))
            .expect("read rule");
        assert_eq!(read["action"], "SCMP_ACT_TRACE");
        assert!(read.get("errnoRet").is_none());
    }

    #[test]
    fn no_profile_traces_everything_and_allows_the_rest() {
        let m = merge(None).expect("merge");
        assert_eq!(m.profile.default_action(), Action::ScmpActAllow);
        assert_eq!(m.traced.len(), crate::syscalls::TRACED.len());
        for s in crate::syscalls::TRACED {
            assert_eq!(
                evaluate(&m.profile, s.name, &[0; 6]),
                Action::ScmpActTrace,
                "{}",
                s.name
            );
        }
        assert_eq!(evaluate(&m.profile, "write", &[0; 6]), Action::ScmpActAllow);
        let mut allow_all = LinuxSeccomp::default();
        allow_all.set_default_action(Action::ScmpActAllow);
        check_property(&allow_all, &m);
    }

    #[test]
    fn permissive_profile_with_denials() {
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{
              "defaultAction": "SCMP_ACT_ALLOW",
              "syscalls": [
                {"names": ["recvmsg", "socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["accept4"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 3, "value": 2048, "op": "SCMP_CMP_EQ"}]},
                {"names": ["getsockopt"], "action": "SCMP_ACT_KILL",
                 "args": [{"index": 1, "value": 6, "op": "SCMP_CMP_GE"}]},
                {"names": ["getsockopt"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 2, "value": 3, "op": "SCMP_CMP_LT"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ERRNO",
                 "args": [{"index": 0, "value": 268435456, "valueTwo": 268435456,
                           "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["read", "write"], "action": "SCMP_ACT_LOG"},
                {"names": ["poll"], "action": "SCMP_ACT_NOTIFY"}
              ]
            }"#,
        )
        .expect("profile parses");
        let m = merge(Some(&p)).expect("merge");
        check_property(&p, &m);
        assert!(m.denied.iter().any(|n| n == "recvmsg"));
        assert!(m.partly_traced.iter().any(|n| n == "accept4"));
        assert!(m.partly_traced.iter().any(|n| n == "getsockopt"));
        assert!(m.traced.iter().any(|n| n == "read"));
        assert_eq!(
            evaluate(&m.profile, "accept4", &[3, 0, 0, 2048, 0, 0]),
            Action::ScmpActErrno
        );
        assert_eq!(
            evaluate(&m.profile, "accept4", &[3, 0, 0, 0x80000, 0, 0]),
            Action::ScmpActTrace
        );
        assert_eq!(
            evaluate(&m.profile, "getsockopt", &[3, 7, 9, 0, 0, 0]),
            Action::ScmpActKill
        );
        assert_eq!(
            evaluate(&m.profile, "getsockopt", &[3, 1, 9, 0, 0, 0]),
            Action::ScmpActTrace
        );
        // The MASKED_EQ denial has no one-rule complement: reported, not silently dropped.
        let untraced: Vec<&str> = m.untraced.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(untraced, ["poll", "clone"]);
        // write keeps its LOG; read's LOG became TRACE in a rule of its own.
        assert_eq!(evaluate(&m.profile, "write", &[0; 6]), Action::ScmpActLog);
        assert_eq!(evaluate(&m.profile, "read", &[0; 6]), Action::ScmpActTrace);
    }

    #[test]
    fn trace_everything_profile_is_already_traced() {
        let mut p = LinuxSeccomp::default();
        p.set_default_action(Action::ScmpActTrace);
        let m = merge(Some(&p)).expect("merge");
        assert_eq!(m.traced.len(), crate::syscalls::TRACED.len());
        check_property(&p, &m);
    }
}
