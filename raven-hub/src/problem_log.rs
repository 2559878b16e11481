//! Logs every problem of the published topology once: when it first
//! appears (an error as an error, a warning as a warning), with its object,
//! field and value. A problem that goes away and comes back is logged again;
//! one that stays is not repeated at every revision.

use std::collections::BTreeSet;

use raven_core::{Problem, Severity};

/// The problems already logged.
#[derive(Debug, Default)]
pub struct ProblemLog {
    logged: BTreeSet<Problem>,
}

impl ProblemLog {
    /// Takes the current problems; returns those not in the previous set,
    /// in order, and forgets the ones that went away.
    pub fn observe(&mut self, problems: &[Problem]) -> Vec<Problem> {
        let current: BTreeSet<Problem> = problems.iter().cloned().collect();
        let new = current.difference(&self.logged).cloned().collect();
        self.logged = current;
        new
    }

    /// [`ProblemLog::observe`], logging each new problem.
    pub fn log(&mut self, revision: u64, problems: &[Problem]) {
        let new = self.observe(problems);
        macro_rules! log_problem {
            ($level:ident, $p:expr) => {
                tracing::$level!(
                    object = %$p.object,
                    field = %$p.field,
                    value = %$p.value,
                    revision,
                    "{}",
                    $p.message
                )
            };
        }
        for p in &new {
            match p.severity {
                Severity::Error => log_problem!(error, p),
                Severity::Warning => log_problem!(warn, p),
            }
        }
        if !new.is_empty() {
            tracing::info!(
                revision,
                problems = problems.len(),
                new = new.len(),
                "the topology has problems (each logged once when it appears; all of them: GetTopology or raven-hub status)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(object: &str) -> Problem {
        Problem::error(object, "spec.endpoints[0].nodeName", "x", "no such node")
    }

    #[test]
    fn a_problem_is_reported_once_while_it_lasts_and_again_when_it_returns() {
        let mut log = ProblemLog::default();
        assert_eq!(log.observe(&[p("Gateway/a"), p("Gateway/b")]).len(), 2);
        assert_eq!(log.observe(&[p("Gateway/a"), p("Gateway/b")]), vec![]);
        assert_eq!(
            log.observe(&[p("Gateway/b"), p("Gateway/c")]),
            vec![p("Gateway/c")]
        );
        assert_eq!(
            log.observe(&[p("Gateway/a"), p("Gateway/b")]),
            vec![p("Gateway/a")]
        );
    }
}
