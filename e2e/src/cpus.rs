//! Where a bench's processes run: the measured processes on one CPU, everything else (load
//! generators, upstreams, the bench itself) on the others.
//!
//! Two processes measured at the same time on the same CPU see the same machine: whatever
//! other work does to that core's speed and caches during the window hits both. On the shared
//! 2-vCPU machines Fledge is measured on, that is what makes a 1% difference visible
//! (docs/filter-performance.md, "Two Envoys at once, on one CPU"): two Envoys running the same
//! module, measured one after the other, differed by up to 10% per measurement; at the same
//! time on different CPUs still by up to 11% (the vCPUs are not equally fast from moment to
//! moment); at the same time on one CPU by at most 2%.

use anyhow::{ensure, Context, Result};
use std::process::Command;

/// The CPU the measured processes share, and the CPUs left for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub measured: usize,
    pub others: Vec<usize>,
}

impl Placement {
    /// The last CPU this process may run on for the measured processes, the rest for
    /// everything else; `None` with fewer than two CPUs or without `taskset` (util-linux).
    pub fn detect() -> Option<Placement> {
        let allowed = allowed_cpus("self")?;
        let taskset = Command::new("taskset").arg("-V").output();
        if !taskset.is_ok_and(|out| out.status.success()) {
            return None;
        }
        Placement::split(&allowed)
    }

    /// The last of `allowed` measured, the others for the rest; `None` below two CPUs.
    pub fn split(allowed: &[usize]) -> Option<Placement> {
        let (measured, others) = allowed.split_last()?;
        (!others.is_empty()).then(|| Placement {
            measured: *measured,
            others: others.to_vec(),
        })
    }

    /// Keep `pid` (all its threads) on the measured CPU.
    pub fn measure(&self, pid: u32) -> Result<()> {
        pin(pid, &[self.measured])
    }

    /// Keep `pid` (all its threads, and the children it starts later) off the measured CPU.
    pub fn keep_off(&self, pid: u32) -> Result<()> {
        pin(pid, &self.others)
    }

    pub fn describe(&self) -> String {
        format!(
            "measured Envoys on CPU {}, load generators, upstream and bench on CPU {}",
            self.measured,
            cpu_list(&self.others)
        )
    }
}

/// The CPUs process `pid` (or `self`) may run on, from `/proc/<pid>/status`.
pub fn allowed_cpus(pid: &str) -> Option<Vec<usize>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .and_then(|list| parse_cpu_list(list.trim()))
}

/// Parse a kernel CPU list (`0-3,5`); `None` if malformed.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (first.parse::<usize>().ok()?, last.parse::<usize>().ok()?);
                if first > last {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Set the CPU affinity of every thread of `pid`; threads it starts later inherit it.
fn pin(pid: u32, cpus: &[usize]) -> Result<()> {
    let output = Command::new("taskset")
        .args(["-a", "-cp", &cpu_list(cpus), &pid.to_string()])
        .output()
        .context("running taskset")?;
    ensure!(
        output.status.success(),
        "taskset -a -cp {} {pid}: {}",
        cpu_list(cpus),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0-2,5,7-8"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_cpu_list("3"), Some(vec![3]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("2-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }

    #[test]
    fn the_last_cpu_is_measured_and_one_cpu_is_not_split() {
        assert_eq!(
            Placement::split(&[0, 1, 2]),
            Some(Placement {
                measured: 2,
                others: vec![0, 1]
            })
        );
        assert_eq!(Placement::split(&[4]), None);
        assert_eq!(Placement::split(&[]), None);
    }

    #[test]
    fn a_pinned_child_runs_only_on_its_cpu() -> Result<()> {
        let Some(placement) = Placement::detect() else {
            return Ok(()); // one CPU or no taskset: nothing to pin
        };
        let mut child = Command::new("sleep").arg("5").spawn()?;
        let pinned = placement.measure(child.id());
        let allowed = allowed_cpus(&child.id().to_string());
        child.kill()?;
        child.wait()?;
        pinned?;
        assert_eq!(allowed, Some(vec![placement.measured]));
        Ok(())
    }
}
