//! The semaphore's loop: the thin shell around [`Barriers`] and [`Schedules`] that owns the
//! broker link, the job directory and the [`Store`].
//!
//! One thread selects over the broker's publications (completion events), a ticker and the
//! shutdown trigger. Every turn ends the same way: whatever the barriers and schedules
//! decided is committed to the store, and only then are the triggers it implies sent. So a decision
//! is never acted on before it is durable, and a restart resends exactly what was decided.
//!
//! Besides live events, completions are fetched from the broker ("catch-up") at start,
//! every `catch_up_interval`, when new jobs are awaited and when the link reports a new
//! broker instance, from the high-water mark (where the last complete catch-up began, by
//! our clock) minus [`CATCH_UP_MARGIN_MS`]; overlap is harmless because a completion
//! counts once. (Today's `Client` greets the broker only once, so a broker restart is
//! caught by the periodic catch-up.)

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{select, tick, Receiver, TryRecvError};
use jobz::client::{Client, ClientConfig, ClientError};
use jobz::envelope::Envelope;
use jobz::jobfile::JobDir;
use jobz::message::{Event, Message, Params, Query, ReplyBody, Role, TriggerRequest};
use jobz::topic::Topic;
use tracing::{debug, error, info, warn};

use crate::barrier::{Action, BarrierId, Barriers, Trigger};
use crate::config::Config;
use crate::schedule::{ScheduleAction, Schedules};
use crate::state::Store;

/// How often the loop wakes without any message.
const TICK: Duration = Duration::from_millis(50);
/// How often `--jobs-dir` is looked at for changed files.
const JOBS_REFRESH: Duration = Duration::from_secs(1);
/// Catch-up starts this long before the high-water mark: completion times come from the
/// workers' clocks and are journaled in arrival order, not time order.
pub const CATCH_UP_MARGIN_MS: i64 = 60_000;
/// First page size of a catch-up; halved when a page gets no answer (too large a reply).
const CATCH_UP_PAGE: u32 = 500;
/// How long a catch-up page or a catalog query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one send of a trigger is resent (under the same id) before it is tried anew.
const TRIGGER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait between two tries of a refused trigger.
const MAX_TRIGGER_BACKOFF: Duration = Duration::from_secs(60);
/// How often the broker's job catalog is fetched (what parameters a `then` job takes).
const CATALOG_REFRESH: Duration = Duration::from_secs(30);
/// Fastest catalog refetch when a trigger needs it.
const CATALOG_MIN_GAP: Duration = Duration::from_secs(1);
/// How often closed barriers are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// A high-water mark that moved is stored at least this often (else with the next write).
const HIGH_WATER_SAVE: Duration = Duration::from_secs(5);
/// How long schedules wait at start for what other processes reported (then they decide
/// on their own: the broker's ingest-once still holds).
const PEERS_WAIT: Duration = Duration::from_secs(10);
/// Most publications handled before their decisions are committed.
const MAX_BATCH: usize = 1000;

/// Runs the semaphore until `shutdown` receives a message (or its sender is dropped).
/// Errors if it cannot start, or if the state cannot be written (it stops rather than act
/// on decisions it could not make durable).
pub fn run(config: Config, shutdown: Receiver<()>) -> anyhow::Result<()> {
    config.validate()?;
    let mut jobs = JobDir::new(&config.jobs_dir);
    let first = jobs
        .refresh()
        .with_context(|| format!("reading jobs dir {}", config.jobs_dir.display()))?;
    for rejected in &first.rejected {
        error!("{rejected}");
    }
    let store = Store::open(&config.state_dir)?;
    let barriers = Barriers::restore(store.load().context("loading the barrier state")?);
    let (marks, fires) = store
        .load_schedules()
        .context("loading the schedule state")?;
    // Slots before this instant fell due while this process did not run.
    let schedules = Schedules::restore(marks, fires, jobz::now_ms());
    // A fresh state starts catching up from now: completions from before this semaphore
    // ever ran are not its business.
    let (high_water, fresh) = match store.high_water()? {
        Some(mark) => (mark, false),
        None => (jobz::now_ms(), true),
    };
    let mut client_config = ClientConfig::new(
        config.broker.clone(),
        config.node_id.clone(),
        Role::Semaphore,
    );
    client_config.identity = config.identity.clone();
    let client = Client::start(client_config)
        .with_context(|| format!("connecting to the broker at {}", config.broker))?;
    let start = Instant::now();
    let mut service = Service {
        client,
        store,
        barriers,
        schedules,
        schedule_actions: Vec::new(),
        peers: PeersCheck::Due,
        peers_deadline: start + PEERS_WAIT,
        jobs,
        subscribed: BTreeSet::new(),
        high_water,
        high_water_dirty: fresh,
        next_high_water_save: start,
        actions: Vec::new(),
        catch_up: None,
        catch_up_due: true,
        next_catch_up: start,
        catch_up_limit: CATCH_UP_PAGE,
        broker_instance: String::new(),
        ready: false,
        sending: HashMap::new(),
        catalog: HashMap::new(),
        catalog_query: None,
        catalog_fetched_at: None,
        next_catalog: start,
        next_status: start,
        next_refresh: start + JOBS_REFRESH,
        next_prune: start,
        config,
    };
    info!(
        node_id = %service.config.node_id,
        broker = %service.config.broker,
        jobs_dir = %service.config.jobs_dir.display(),
        state = %service.config.state_dir.display(),
        barriers = service.barriers.iter().count(),
        version = jobz::VERSION,
        "semaphore starting"
    );
    service.apply_specs();
    let result = service.serve(shutdown);
    if result.is_ok() {
        // Best effort: what was decided is on disk already, unless the commit just failed.
        let _ = service.commit(true);
    }
    service.client.shutdown();
    info!("semaphore stopped");
    result
}

/// An open request for completions.
struct CatchUp {
    reply: Receiver<Result<ReplyBody, ClientError>>,
    jobs: Vec<String>,
    since_ms: i64,
    limit: u32,
    /// Our clock when the first page was asked for: once the last page is in, everything
    /// that had finished by then has been seen (give or take the margin).
    began_ms: i64,
}

/// The start-up question "what did other processes serve while this one was away?"
/// ([`Schedules::note_peers`]); schedules decide and are reported only once it is `Done`.
enum PeersCheck {
    Due,
    Asked(Receiver<Result<ReplyBody, ClientError>>),
    Done,
}

/// Where the sending of one trigger is.
struct Sending {
    reply: Option<Receiver<Result<ReplyBody, ClientError>>>,
    next_try: Instant,
    refusals: u32,
    /// When the trigger became pending here: it waits for a catalog fetched after this.
    since: Instant,
}

struct Service {
    config: Config,
    client: Client,
    store: Store,
    barriers: Barriers,
    schedules: Schedules,
    /// Schedule decisions not yet committed.
    schedule_actions: Vec<ScheduleAction>,
    /// Where the start-up look at other processes' schedules is.
    peers: PeersCheck,
    peers_deadline: Instant,
    jobs: JobDir,
    subscribed: BTreeSet<String>,
    high_water: i64,
    high_water_dirty: bool,
    next_high_water_save: Instant,
    /// Decisions not yet committed.
    actions: Vec<Action>,
    catch_up: Option<CatchUp>,
    catch_up_due: bool,
    next_catch_up: Instant,
    catch_up_limit: u32,
    broker_instance: String,
    ready: bool,
    sending: HashMap<String, Sending>,
    /// Declared parameter names of each job the broker knows.
    catalog: HashMap<String, BTreeSet<String>>,
    catalog_query: Option<Receiver<Result<ReplyBody, ClientError>>>,
    catalog_fetched_at: Option<Instant>,
    next_catalog: Instant,
    next_status: Instant,
    next_refresh: Instant,
    next_prune: Instant,
}

impl Service {
    fn serve(&mut self, shutdown: Receiver<()>) -> anyhow::Result<()> {
        let publications = self.client.publications().clone();
        let ticker = tick(TICK);
        loop {
            select! {
                recv(shutdown) -> _ => {
                    info!("stop requested");
                    return Ok(());
                }
                recv(publications) -> publication => {
                    let Ok((topic, envelope)) = publication else {
                        bail!("the broker link stopped");
                    };
                    self.on_publication(topic, envelope);
                    for _ in 1..MAX_BATCH {
                        match publications.try_recv() {
                            Ok((topic, envelope)) => self.on_publication(topic, envelope),
                            Err(_) => break,
                        }
                    }
                }
                recv(ticker) -> _ => self.on_tick(Instant::now()),
            }
            self.commit(false)?;
            self.send_triggers(Instant::now());
            self.report_status(Instant::now());
        }
    }

    /// Writes the decisions taken so far. Failing to is fatal.
    fn commit(&mut self, force_high_water: bool) -> anyhow::Result<()> {
        let now = Instant::now();
        let save_mark = self.high_water_dirty
            && (force_high_water || !self.actions.is_empty() || now >= self.next_high_water_save);
        if self.actions.is_empty() && self.schedule_actions.is_empty() && !save_mark {
            return Ok(());
        }
        let mark = save_mark.then_some(self.high_water);
        if let Err(e) =
            self.store
                .apply(&self.barriers, &self.actions, &self.schedule_actions, mark)
        {
            error!(error = %format!("{e:#}"), "cannot write the semaphore state; stopping");
            return Err(e).context("writing the semaphore state");
        }
        debug!(
            actions = self.actions.len(),
            schedule_actions = self.schedule_actions.len(),
            "semaphore state committed"
        );
        self.actions.clear();
        self.schedule_actions.clear();
        if save_mark {
            self.high_water_dirty = false;
            self.next_high_water_save = now + HIGH_WATER_SAVE;
        }
        Ok(())
    }

    fn on_publication(&mut self, topic: Topic, envelope: Envelope) {
        match envelope.body {
            Message::Event(Event::TaskFinished(completion)) => {
                if topic != Topic::Events(completion.job.clone()) {
                    warn!(%topic, job = %completion.job, "dropping a completion published under another job's topic");
                    return;
                }
                self.feed(&completion, false);
            }
            other => {
                debug!(%topic, message = ?std::mem::discriminant(&other), "ignoring a publication")
            }
        }
    }

    /// Counts a completion. Only those fetched by catch-up move the high-water mark: a
    /// live event proves nothing about the ones before it that may have been lost.
    fn feed(&mut self, completion: &jobz::message::Completion, fetched: bool) {
        let now = jobz::now_ms();
        if fetched {
            // Never past our own clock: a worker whose clock runs ahead must not make the
            // next catch-up skip what others finished meanwhile.
            let mark = completion.finished_at_ms.min(now);
            if mark > self.high_water {
                self.high_water = mark;
                self.high_water_dirty = true;
            }
        }
        let actions = self.barriers.on_completion(completion, now);
        self.actions.extend(actions);
    }

    fn on_tick(&mut self, now: Instant) {
        if now >= self.next_refresh {
            self.next_refresh = now + JOBS_REFRESH;
            self.refresh_jobs();
        }
        let instance = self.client.broker_instance();
        if !instance.is_empty() && instance != self.broker_instance {
            if !self.broker_instance.is_empty() {
                info!(broker_instance = %instance, "the broker restarted; catching up");
            }
            self.broker_instance = instance;
            self.catch_up_due = true;
            self.next_catalog = now;
        }
        self.poll_catch_up(now);
        self.start_catch_up_if_due(now);
        self.poll_catalog(now);
        self.poll_triggers(now);
        let actions = self.barriers.on_tick(jobz::now_ms());
        self.actions.extend(actions);
        self.check_peers(now);
        if matches!(self.peers, PeersCheck::Done) {
            let actions = self.schedules.on_tick(jobz::now_ms());
            self.schedule_actions.extend(actions);
        }
        if now >= self.next_prune {
            self.next_prune = now + PRUNE_EVERY;
            let actions = self.barriers.prune(jobz::now_ms());
            if !actions.is_empty() {
                info!(
                    barriers = actions.len(),
                    "forgetting barriers closed a week ago"
                );
            }
            self.actions.extend(actions);
        }
    }

    /// Reports the barriers and schedules, when due. Called after a commit, so a report
    /// shows nothing a crash could undo; and not before the peers check, which the broker
    /// would otherwise answer with this process's own report.
    fn report_status(&mut self, now: Instant) {
        let peers_done = matches!(self.peers, PeersCheck::Done);
        if now < self.next_status || !self.client.is_connected() || !peers_done {
            return;
        }
        self.next_status = now + self.config.status_interval;
        let mut barriers = self.barriers.views(jobz::now_ms(), &self.config.node_id);
        for view in &mut barriers {
            // Show what the (first) `then` job would get, not everything the first
            // completion carried.
            let then = self
                .barriers
                .spec(&view.semaphore)
                .and_then(|s| s.then.first().cloned());
            if let Some(job) = then {
                view.params = self.params_for(&view.semaphore, &job, &view.params);
            }
        }
        let schedules = self.schedules.views(&self.config.node_id);
        self.client.send(Message::SemaphoreStatus {
            barriers,
            schedules,
        });
    }

    /// Asks the broker once, at start, what the other processes reported of their
    /// schedules, and lets the schedules skip what those served.
    fn check_peers(&mut self, now: Instant) {
        let answer = match &self.peers {
            PeersCheck::Done => return,
            PeersCheck::Due => {
                if self.client.is_connected() {
                    let reply = self
                        .client
                        .request_async(Message::Query(Query::Schedules), QUERY_TIMEOUT);
                    self.peers = PeersCheck::Asked(reply);
                } else if now >= self.peers_deadline {
                    warn!("the broker did not answer in time: schedules start without knowing what other semaphores served");
                    self.peers = PeersCheck::Done;
                }
                return;
            }
            PeersCheck::Asked(reply) => match reply.try_recv() {
                Err(TryRecvError::Empty) => return,
                Ok(answer) => answer,
                Err(TryRecvError::Disconnected) => Err(ClientError::Closed),
            },
        };
        self.peers = PeersCheck::Done;
        match answer {
            Ok(ReplyBody::Schedules(views)) => {
                debug!(views = ?views, "schedules other semaphores reported");
                let actions =
                    self.schedules
                        .note_peers(&views, &self.config.node_id, jobz::now_ms());
                self.schedule_actions.extend(actions);
            }
            Ok(other) => {
                warn!(reply = ?std::mem::discriminant(&other), "unexpected answer to a schedules query")
            }
            Err(e) => {
                warn!(error = %e, "cannot learn what other semaphores served; schedules start without it")
            }
        }
    }

    // ---- Job files ----------------------------------------------------------------------

    fn refresh_jobs(&mut self) {
        match self.jobs.refresh() {
            Ok(report) => {
                for rejected in &report.rejected {
                    error!("{rejected}");
                }
                if report.changed() {
                    self.apply_specs();
                }
            }
            Err(e) => warn!(jobs_dir = %self.jobs.dir().display(), error = %e,
                "cannot read the jobs dir; keeping the semaphores loaded before"),
        }
    }

    fn apply_specs(&mut self) {
        let (set, conflicts) = self.jobs.job_set();
        for conflict in &conflicts {
            error!("{conflict}");
        }
        let actions = self.barriers.set_specs(&set.semaphores, jobz::now_ms());
        self.actions.extend(actions);
        let actions = self.schedules.set_specs(&set.schedules, jobz::now_ms());
        self.schedule_actions.extend(actions);
        let awaited = self.barriers.awaited_jobs();
        let added: Vec<String> = awaited.difference(&self.subscribed).cloned().collect();
        let removed: Vec<String> = self.subscribed.difference(&awaited).cloned().collect();
        for job in &added {
            self.client.subscribe(Topic::Events(job.clone()));
        }
        for job in &removed {
            self.client.unsubscribe(Topic::Events(job.clone()));
        }
        if !added.is_empty() {
            // Completions published before the subscription took effect come this way.
            self.catch_up_due = true;
        }
        self.subscribed = awaited;
        info!(
            semaphores = set.semaphores.len(),
            schedules = set.schedules.len(),
            awaited = ?self.subscribed,
            "semaphores loaded"
        );
        if set.semaphores.is_empty() && set.schedules.is_empty() {
            warn!(jobs_dir = %self.jobs.dir().display(), "no semaphores or schedules defined");
        }
    }

    // ---- Catch-up -----------------------------------------------------------------------

    fn start_catch_up_if_due(&mut self, now: Instant) {
        if self.catch_up.is_some() || !self.client.is_connected() {
            return;
        }
        if !self.catch_up_due && now < self.next_catch_up {
            return;
        }
        self.catch_up_due = false;
        let jobs: Vec<String> = self.subscribed.iter().cloned().collect();
        if jobs.is_empty() {
            self.next_catch_up = now + self.config.catch_up_interval;
            self.mark_ready();
            return;
        }
        let now_ms = jobz::now_ms();
        let since_ms = self.high_water.min(now_ms) - CATCH_UP_MARGIN_MS;
        self.request_page(jobs, since_ms, now_ms);
    }

    fn request_page(&mut self, jobs: Vec<String>, since_ms: i64, began_ms: i64) {
        let limit = self.catch_up_limit;
        debug!(
            since_ms,
            limit,
            jobs = jobs.len(),
            "catching up on completions"
        );
        let reply = self.client.request_async(
            Message::Query(Query::Completions {
                jobs: jobs.clone(),
                since_ms,
                limit,
            }),
            QUERY_TIMEOUT,
        );
        self.catch_up = Some(CatchUp {
            reply,
            jobs,
            since_ms,
            limit,
            began_ms,
        });
    }

    fn poll_catch_up(&mut self, now: Instant) {
        let Some(open) = &self.catch_up else {
            return;
        };
        let answer = match open.reply.try_recv() {
            Ok(answer) => answer,
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => Err(ClientError::Closed),
        };
        let Some(open) = self.catch_up.take() else {
            return;
        };
        match answer {
            Ok(ReplyBody::Completions(completions)) => {
                let full = completions.len() as u32 >= open.limit;
                let last = completions.last().map(|c| c.finished_at_ms);
                debug!(
                    count = completions.len(),
                    since_ms = open.since_ms,
                    "catch-up page"
                );
                for completion in &completions {
                    if self.subscribed.contains(&completion.job) {
                        self.feed(completion, true);
                    }
                }
                match (full, last) {
                    (true, Some(last)) => {
                        let next = if last > open.since_ms {
                            last
                        } else {
                            // A whole page ended in one millisecond: step past it rather
                            // than ask for the same page forever.
                            warn!(
                                since_ms = open.since_ms,
                                "a catch-up page ended where it began; skipping a millisecond"
                            );
                            open.since_ms + 1
                        };
                        self.request_page(open.jobs, next, open.began_ms);
                    }
                    _ => {
                        if open.began_ms > self.high_water {
                            self.high_water = open.began_ms;
                            self.high_water_dirty = true;
                        }
                        self.next_catch_up = now + self.config.catch_up_interval;
                        self.mark_ready();
                    }
                }
            }
            Ok(ReplyBody::Rejected { status, error }) => {
                warn!(status, %error, "the broker refused the catch-up query");
                self.next_catch_up = now + self.config.catch_up_interval;
            }
            Ok(other) => {
                warn!(reply = ?std::mem::discriminant(&other), "unexpected answer to a catch-up query");
                self.next_catch_up = now + self.config.catch_up_interval;
            }
            Err(ClientError::Timeout(_)) => {
                // Maybe a reply too large for one frame: ask for less.
                self.catch_up_limit = (self.catch_up_limit / 2).max(1);
                warn!(
                    limit = self.catch_up_limit,
                    "catch-up query unanswered; retrying with smaller pages"
                );
                self.request_page(open.jobs, open.since_ms, open.began_ms);
            }
            Err(e) => {
                warn!(error = %e, "catch-up query failed");
                self.next_catch_up = now + self.config.catch_up_interval;
            }
        }
    }

    fn mark_ready(&mut self) {
        if !self.ready {
            self.ready = true;
            info!(
                barriers = self.barriers.iter().count(),
                "semaphore ready: caught up with the broker"
            );
        }
    }

    // ---- The job catalog ----------------------------------------------------------------

    fn poll_catalog(&mut self, now: Instant) {
        if let Some(reply) = &self.catalog_query {
            match reply.try_recv() {
                Err(TryRecvError::Empty) => return,
                Ok(Ok(ReplyBody::Jobs(views))) => {
                    self.catalog = views
                        .into_iter()
                        .map(|v| (v.spec.name.clone(), v.spec.params.keys().cloned().collect()))
                        .collect();
                    self.catalog_fetched_at = Some(now);
                    debug!(jobs = self.catalog.len(), "job catalog fetched");
                }
                Ok(Ok(other)) => {
                    warn!(reply = ?std::mem::discriminant(&other), "unexpected answer to a jobs query")
                }
                Ok(Err(e)) => warn!(error = %e, "cannot fetch the job catalog"),
                Err(TryRecvError::Disconnected) => {}
            }
            self.catalog_query = None;
        }
        if now >= self.next_catalog && self.client.is_connected() {
            self.next_catalog = now + CATALOG_REFRESH;
            self.catalog_query = Some(
                self.client
                    .request_async(Message::Query(Query::Jobs), QUERY_TIMEOUT),
            );
        }
    }

    /// Asks for the catalog again soon (rate-limited).
    fn want_catalog(&mut self, now: Instant) {
        let soonest = self
            .catalog_fetched_at
            .map_or(now, |at| at + CATALOG_MIN_GAP);
        if self.catalog_query.is_none() && self.next_catalog > soonest {
            self.next_catalog = soonest.max(now);
        }
    }

    /// What a trigger of `job` passes: the barrier's parameters that the job declares; when
    /// the broker does not know the job, those the semaphore's key names.
    fn params_for(&self, semaphore: &str, job: &str, params: &Params) -> Params {
        let keep = |name: &String| match self.catalog.get(job) {
            Some(declared) => declared.contains(name),
            None => self.barriers.key_params(semaphore).contains(name),
        };
        params
            .iter()
            .filter(|(name, _)| keep(name))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    // ---- Triggers -----------------------------------------------------------------------

    fn send_triggers(&mut self, now: Instant) {
        if !self.client.is_connected() {
            return;
        }
        let pending: Vec<(BarrierId, Trigger)> = self
            .barriers
            .pending_triggers()
            .map(|(id, t)| (id.clone(), t.clone()))
            .collect();
        let mut need_catalog = false;
        for (barrier, trigger) in pending {
            let Some(since) = self.due_to_send(&trigger.id, now) else {
                continue;
            };
            // Wait for a catalog that can know the job, so the parameters passed do not
            // depend on how stale the catalog was when the barrier closed.
            let known = self.catalog.contains_key(&trigger.job);
            let fresh = self.catalog_fetched_at.is_some_and(|at| at >= since);
            if !known && !fresh {
                need_catalog = true;
                continue;
            }
            let params = self.params_for(&barrier.semaphore, &trigger.job, &trigger.params);
            info!(semaphore = %barrier.semaphore, key = %barrier.key, job = %trigger.job,
                kind = trigger.kind.as_str(), trigger_id = %trigger.id, "sending trigger");
            let request = TriggerRequest {
                job: trigger.job.clone(),
                params,
                parent_runs: trigger.parent_runs.clone(),
                ..Default::default()
            };
            self.send_trigger(&trigger.id, request);
        }
        if need_catalog {
            self.want_catalog(now);
        }
        // A schedule's parameters are its own (rendered for the slot): no catalog needed.
        let fires: Vec<(String, TriggerRequest)> = self
            .schedules
            .pending()
            .map(|f| {
                let request = TriggerRequest {
                    job: f.job.clone(),
                    params: f.params.clone(),
                    ..Default::default()
                };
                (f.id.clone(), request)
            })
            .collect();
        for (id, request) in fires {
            if self.due_to_send(&id, now).is_some() {
                info!(job = %request.job, trigger_id = %id, "sending schedule trigger");
                self.send_trigger(&id, request);
            }
        }
    }

    /// If the trigger `id` is not in flight and its back-off is over: since when it has
    /// been pending here.
    fn due_to_send(&mut self, id: &str, now: Instant) -> Option<Instant> {
        let sending = self
            .sending
            .entry(id.to_owned())
            .or_insert_with(|| Sending {
                reply: None,
                next_try: now,
                refusals: 0,
                since: now,
            });
        (sending.reply.is_none() && now >= sending.next_try).then_some(sending.since)
    }

    /// Sends a trigger under its deterministic id and keeps the reply to poll.
    fn send_trigger(&mut self, id: &str, request: TriggerRequest) {
        let reply =
            self.client
                .request_with_id(id.to_owned(), Message::Trigger(request), TRIGGER_TIMEOUT);
        if let Some(sending) = self.sending.get_mut(id) {
            sending.reply = Some(reply);
        }
    }

    fn poll_triggers(&mut self, now: Instant) {
        let mut accepted = Vec::new();
        let mut refused = false;
        for (id, sending) in self.sending.iter_mut() {
            let Some(reply) = &sending.reply else {
                continue;
            };
            let answer = match reply.try_recv() {
                Ok(answer) => answer,
                Err(TryRecvError::Empty) => continue,
                Err(TryRecvError::Disconnected) => Err(ClientError::Closed),
            };
            sending.reply = None;
            match answer {
                Ok(ReplyBody::Accepted { run_id }) => accepted.push((id.clone(), run_id)),
                Ok(ReplyBody::Rejected { status, error }) => {
                    // Not remembered by the broker: a later try under the same id is a
                    // first try. Fixing the job file or starting its worker heals it.
                    sending.refusals += 1;
                    let wait = Duration::from_secs(1u64 << sending.refusals.min(6))
                        .min(MAX_TRIGGER_BACKOFF);
                    error!(trigger_id = %id, status, %error, retry_in = ?wait, "the broker refused a trigger");
                    sending.next_try = now + wait;
                    refused = true;
                }
                Ok(other) => {
                    warn!(trigger_id = %id, reply = ?std::mem::discriminant(&other), "unexpected answer to a trigger");
                    sending.next_try = now + Duration::from_secs(1);
                }
                Err(e) => {
                    warn!(trigger_id = %id, error = %e, "trigger unanswered; sending it again under the same id");
                    sending.next_try = now;
                }
            }
        }
        if refused {
            self.want_catalog(now);
        }
        for (id, run_id) in accepted {
            self.sending.remove(&id);
            if self.schedules.owns(&id) {
                let actions = self.schedules.on_accepted(&id, &run_id);
                self.schedule_actions.extend(actions);
            } else if let Some(action) = self.barriers.on_accepted(&id, &run_id) {
                self.actions.push(action);
            }
        }
        // Forget sends of triggers that are no longer pending (accepted elsewhere, pruned).
        let pending: BTreeSet<&str> = self
            .barriers
            .pending_triggers()
            .map(|(_, t)| t.id.as_str())
            .chain(self.schedules.pending().map(|f| f.id.as_str()))
            .collect();
        self.sending
            .retain(|id, s| s.reply.is_some() || pending.contains(id.as_str()));
    }
}
