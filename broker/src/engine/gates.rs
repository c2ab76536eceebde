//! Steps of jobs with `inputs:`/`outputs:`: they ask [`Resources`] before they are placed,
//! hold what they got until they end, and mark their outputs written when they succeed.
//! Operators create and clear resources; queries show them and the lineage graph.

use jobz::envelope::Envelope;
use jobz::jobfile::is_valid_resource_name;
use jobz::message::{LineageEdge, ReplyBody, ResourceAction};
use jobz::template::Template;
use tracing::{info, warn};

use super::effects::{reply, Effects, Write};
use super::resources::{Edge, Needs, Written};
use super::Engine;
use crate::ids::{RunId, StepId};

impl Engine {
    /// What a step of `job` in `run_id` asks for, its names filled in from the run's
    /// parameters; `Ok(None)` for a job without inputs or outputs.
    fn needs_of(&self, run_id: &RunId, job: &str) -> Result<Option<Needs>, String> {
        let Some(spec) = self.registry.job(job) else {
            return Ok(None);
        };
        if spec.inputs.is_empty() && spec.outputs.is_empty() {
            return Ok(None);
        }
        let params = self
            .active
            .run(run_id)
            .map(|r| r.params.clone())
            .unwrap_or_default();
        let render = |what: &str, templates: &[String]| -> Result<Vec<String>, String> {
            let mut names: Vec<String> = Vec::with_capacity(templates.len());
            for text in templates {
                let name = Template::parse(text)
                    .map_err(|e| e.to_string())
                    .and_then(|t| t.render_plain(&params).map_err(|e| e.to_string()))
                    .map_err(|e| format!("{what} {text:?}: {e}"))?;
                if !is_valid_resource_name(&name) {
                    return Err(format!(
                        "{what} {text:?} names {name:?}, which is not a valid resource name"
                    ));
                }
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            Ok(names)
        };
        Ok(Some(Needs {
            run_id: run_id.clone(),
            job: job.to_owned(),
            inputs: render("input", &spec.inputs)?,
            outputs: render("output", &spec.outputs)?,
        }))
    }

    /// A new step asks for its resources. True if it may be placed now; false if it waits
    /// for them (or failed: its names could not be filled in).
    pub(super) fn gate_step(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        run_id: &RunId,
        job: &str,
        origin_worker: Option<String>,
        now: i64,
    ) -> bool {
        let needs = match self.needs_of(run_id, job) {
            Ok(Some(needs)) => needs,
            Ok(None) => return true,
            Err(reason) => {
                self.fail_unplaced(fx, step_id, origin_worker, reason, now);
                return false;
            }
        };
        let granted = self.resources.request(step_id.clone(), needs, now);
        let mine = granted.contains(step_id);
        let others: Vec<StepId> = granted.into_iter().filter(|s| s != step_id).collect();
        self.start_granted(fx, others, now);
        if mine {
            self.note_lineage(fx, step_id);
        } else {
            let reason = self.resources.waiting_reason(step_id, now);
            info!(run_id = %run_id, step_id = %step_id, job = %job,
                reason = reason.as_deref().unwrap_or("-"), "step waits for resources");
        }
        mine
    }

    /// Steps that got their resources after waiting: placed as new steps are.
    fn start_granted(&mut self, fx: &mut Effects, steps: Vec<StepId>, now: i64) {
        for step_id in steps {
            let Some(step) = self.active.step(&step_id) else {
                continue;
            };
            let (run_id, job, delivery) = (step.run_id.clone(), step.job.clone(), step.delivery);
            info!(run_id = %run_id, step_id = %step_id, job = %job, "step got its resources");
            self.note_lineage(fx, &step_id);
            let origin = self.origin_worker(&step_id);
            self.place_new_step(fx, &step_id, delivery, origin, now);
        }
    }

    /// Journals the lineage edges of a step that got its resources, the new ones only.
    fn note_lineage(&mut self, fx: &mut Effects, step_id: &StepId) {
        let Some(needs) = self.resources.needs_of(step_id).cloned() else {
            return;
        };
        for edge in self.resources.note_lineage(&needs) {
            fx.writes.push(Write::Edge(edge));
        }
    }

    /// A step ended (or left the line): what it held is free, its outputs are written if
    /// it succeeded, and the steps that may now start are placed.
    pub(super) fn release_resources(
        &mut self,
        fx: &mut Effects,
        step_id: &StepId,
        succeeded: bool,
        now: i64,
    ) {
        let (mut granted, held) = self.resources.release(step_id, now);
        if let Some(needs) = held.filter(|n| succeeded && !n.outputs.is_empty()) {
            let ttl = self
                .registry
                .job(&needs.job)
                .and_then(|s| s.output_ttl_ms)
                .map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
            let records: Vec<Written> = needs
                .outputs
                .iter()
                .map(|name| Written {
                    name: name.clone(),
                    written_at_ms: now,
                    expires_at_ms: ttl.map(|ttl| now.saturating_add(ttl)),
                    run_id: Some(needs.run_id.clone()),
                    job: Some(needs.job.clone()),
                })
                .collect();
            info!(run_id = %needs.run_id, job = %needs.job, outputs = %needs.outputs.join(","),
                "outputs written");
            fx.writes
                .extend(records.iter().cloned().map(Write::Resource));
            granted.extend(self.resources.write(records, now));
        }
        self.start_granted(fx, granted, now);
    }

    /// An operator creates or clears a resource (`POST /resources/{name}`).
    pub(super) fn on_control_resource(
        &mut self,
        fx: &mut Effects,
        env: &Envelope,
        name: String,
        action: ResourceAction,
        now: i64,
    ) {
        if !is_valid_resource_name(&name) {
            let error = format!("{name:?} is not a valid resource name");
            return reply(fx, env, ReplyBody::Rejected { status: 400, error });
        }
        info!(resource = %name, ?action, sender = %env.sender, "resource changed by an operator");
        match action {
            ResourceAction::Create => {
                let record = Written {
                    name: name.clone(),
                    written_at_ms: now,
                    expires_at_ms: None,
                    run_id: None,
                    job: None,
                };
                fx.writes.push(Write::Resource(record.clone()));
                let granted = self.resources.write(vec![record], now);
                self.start_granted(fx, granted, now);
            }
            ResourceAction::Clear => {
                self.resources.clear(&name);
                fx.writes
                    .push(Write::ResourceCleared { name: name.clone() });
            }
        }
        let view = self
            .resources
            .views(now)
            .into_iter()
            .filter(|v| v.name == name)
            .collect();
        reply(fx, env, ReplyBody::Resources(view));
    }

    /// `GET /graph`: every lineage edge.
    pub(super) fn lineage(&self) -> Vec<LineageEdge> {
        self.resources
            .edges()
            .map(|edge| match edge {
                Edge::Reads { resource, job } => LineageEdge {
                    from: resource.clone(),
                    to: job.clone(),
                    kind: "reads".into(),
                },
                Edge::Writes { job, resource } => LineageEdge {
                    from: job.clone(),
                    to: resource.clone(),
                    kind: "writes".into(),
                },
            })
            .collect()
    }

    /// After a restart: steps of jobs with resources take them up again. A step that was
    /// placed held them (it takes them without asking, in the order steps were made); one
    /// that was not asks again, and leaves the slot line unless it got them at once.
    pub(super) fn resume_resources(&mut self, steps: &[StepId], now: i64) {
        let mut asking = Vec::new();
        for step_id in steps {
            let Some(step) = self.active.step(step_id) else {
                continue;
            };
            let (run_id, job) = (step.run_id.clone(), step.job.clone());
            let needs = match self.needs_of(&run_id, &job) {
                Ok(Some(needs)) => needs,
                Ok(None) => continue,
                Err(reason) => {
                    // The job changed since: it is placed as it is, and fails there if it must.
                    warn!(step_id = %step_id, %reason, "a resumed step's resources cannot be named");
                    continue;
                }
            };
            match self.active.tasks_of(step_id).next() {
                Some(_) => self.resources.hold(step_id.clone(), needs),
                None => asking.push((step_id.clone(), needs)),
            }
        }
        for (step_id, needs) in asking {
            let granted = self.resources.request(step_id.clone(), needs, now);
            if !granted.contains(&step_id) {
                self.active.stop_waiting(&step_id);
            }
            // Others granted were waiting already: they are in the slot line (placed at
            // the first tick).
        }
    }
}
