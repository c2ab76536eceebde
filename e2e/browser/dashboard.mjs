// The dashboard in a real browser (issue 13): Debian's headless Chromium driven by
// playwright-core. Started by e2e/tests/it/dashboard.rs against a mesh it runs, with:
//   JOBZ_URL        the frontend's base URL
//   JOBZ_ARTIFACTS  where screenshots go (one per page)
//   JOBZ_HELD_FIFO  the fifo the job `held` waits on (a line written there ends it)
// Exits 0 when every check holds; prints what failed otherwise.

import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const base = process.env.JOBZ_URL;
const artifacts = process.env.JOBZ_ARTIFACTS;
const heldFifo = process.env.JOBZ_HELD_FIFO;
assert.ok(base, "JOBZ_URL is not set");
assert.ok(artifacts, "JOBZ_ARTIFACTS is not set");
assert.ok(heldFifo, "JOBZ_HELD_FIFO is not set");
mkdirSync(artifacts, { recursive: true });

const TIMEOUT = 30_000;
// The acceptance bound of a log line: shown within a second of being written.
const SHOWN_WITHIN_MS = 1_000;

// Flags from the machine notes: no sandbox as root, and no background networking (the
// machine's network is closed; Chromium would keep trying).
const browser = await chromium.launch({
  executablePath: process.env.JOBZ_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  timeout: TIMEOUT,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

let step = "starting";
let page = null;
const problems = [];
const shot = async (page, name) => page.screenshot({ path: join(artifacts, name + ".png"), fullPage: true });

// Starts a run over plain HTTP, as a script would (the page must learn of it by itself).
async function trigger(job, params = {}) {
  const q = new URLSearchParams({ job_name: job, ...params });
  const response = await fetch(base + "/job_start?" + q);
  assert.equal(response.status, 202, "trigger " + job);
  return (await response.json()).run_id;
}

const runState = page => page.locator("[data-testid=run] h2 .state");

// Until run `runId` has ended, asked over plain HTTP (the page is not asked).
async function waitEnded(runId) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const run = await (await fetch(base + "/runs/" + encodeURIComponent(runId))).json();
    if (["succeeded", "failed", "cancelled"].includes(run.state)) return run.state;
    assert.ok(Date.now() < deadline, "run " + runId + " did not end");
    await new Promise(r => setTimeout(r, 100));
  }
}

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(TIMEOUT);
  page = await context.newPage();
  page.on("pageerror", e => problems.push("page error: " + e.message));
  page.on("dialog", d => d.accept());
  page.on("console", m => { if (m.type() === "error") problems.push("console: " + m.text()); });

  step = "open the dashboard";
  await page.goto(base + "/");
  await page.locator("[data-testid=status]", { hasText: "live" }).waitFor();
  await shot(page, "01-runs-empty");

  step = "trigger a job from its form";
  await page.click("nav a[data-view=jobs]");
  assert.equal(new URL(page.url()).pathname, "/ui/jobs");
  const form = page.locator("[data-testid=start-greet]");
  await form.locator("input[data-param=name]").fill("browser");
  await shot(page, "02-jobs");
  await form.locator("[data-testid=start]").click();
  await page.waitForURL(/\/ui\/runs\/[^/]+$/);
  const greetRun = decodeURIComponent(new URL(page.url()).pathname.split("/").pop());
  // Turns succeeded without a reload: the feed says so.
  await page.evaluate(() => { window.__notReloaded = true; });
  await runState(page).and(page.locator("[data-state=succeeded]")).waitFor();
  await page.locator("[data-testid=run-log]", { hasText: "hello browser" }).waitFor();
  assert.equal(await page.evaluate(() => window.__notReloaded), true, "the run page was reloaded");
  await shot(page, "03-run-succeeded");

  step = "see a run appear in the list and turn succeeded";
  await page.click("nav a[data-view=runs]");
  await page.locator(`tr[data-run="${greetRun}"] [data-state=succeeded]`).waitFor();
  await page.evaluate(() => { window.__notReloaded = true; });
  const slowRun = await trigger("slow");
  await page.locator(`tr[data-run="${slowRun}"]`).waitFor();
  await page.locator(`tr[data-run="${slowRun}"] [data-state=succeeded]`).waitFor();
  assert.equal(await page.evaluate(() => window.__notReloaded), true, "the list was reloaded");
  await shot(page, "04-runs");

  step = "filter the list";
  await page.fill("[data-testid=run-filters] input[name=job]", "slow");
  await page.click("[data-testid=run-filters] button[type=submit]");
  await page.waitForURL(/\/ui\?job=slow$/);
  await page.locator(`tr[data-run="${slowRun}"]`).waitFor();
  assert.equal(await page.locator(`tr[data-run="${greetRun}"]`).count(), 0, "the filter let another job through");

  step = "open a run by its URL (the link jobs print: /runs/ID)";
  await page.goto(base + "/runs/" + encodeURIComponent(greetRun));
  await page.locator("[data-testid=run] h2", { hasText: greetRun }).waitFor();
  await page.locator("[data-testid=step-graph] rect").first().waitFor();
  await page.locator(`[data-testid=attempts] tr[data-task]`).first().waitFor();

  step = "watch a running step's log lines arrive";
  const tickRun = await trigger("ticker");
  await page.goto(base + "/ui/runs/" + encodeURIComponent(tickRun));
  // Note when each line shows up on the page, by the browser's clock (the same machine's).
  await page.evaluate(() => {
    window.__arrivals = {};
    const log = document.querySelector("[data-testid=run-log]");
    const note = () => {
      for (const m of log.textContent.matchAll(/tick (\d+) (\d+)/g)) {
        if (!(m[1] in window.__arrivals)) window.__arrivals[m[1]] = { written: Number(m[2]), shown: Date.now() };
      }
    };
    new MutationObserver(note).observe(log, { childList: true, characterData: true, subtree: true });
    note();
  });
  await page.locator("[data-testid=run-log]", { hasText: "tick 2 " }).waitFor();
  assert.equal(await runState(page).getAttribute("data-state"), "running", "lines must show while the step runs");
  await shot(page, "05-run-live-log");
  await runState(page).and(page.locator("[data-state=succeeded]")).waitFor();
  const arrivals = await page.evaluate(() => window.__arrivals);
  const ticks = Object.keys(arrivals).map(Number).sort((a, b) => a - b);
  assert.deepEqual(ticks, [1, 2, 3, 4, 5], "each line once: " + JSON.stringify(arrivals));
  for (const n of ticks.slice(0, 4)) {
    const { written, shown } = arrivals[n];
    assert.ok(shown - written <= SHOWN_WITHIN_MS, `tick ${n} written at ${written}, shown at ${shown}`);
  }

  step = "cancel a running run";
  const sleepRun = await trigger("sleeper");
  await page.goto(base + "/ui/runs/" + encodeURIComponent(sleepRun));
  await runState(page).and(page.locator("[data-state=running]")).waitFor();
  await page.click("[data-testid=cancel]");
  await runState(page).and(page.locator("[data-state=cancelled]")).waitFor();
  await shot(page, "06-run-cancelled");

  step = "a run that ends before the page's live feed is open still turns final";
  // The page's /events request is held until the run has ended: that change is never
  // streamed to it, so the page must read the run again once its feed opens.
  let releaseEvents;
  const eventsHeld = new Promise(resolve => { releaseEvents = resolve; });
  await page.route("**/events", async route => { await eventsHeld; await route.continue(); });
  const heldRun = await trigger("held");
  await page.goto(base + "/ui/runs/" + encodeURIComponent(heldRun));
  await runState(page).and(page.locator("[data-state=running]")).waitFor();
  writeFileSync(heldFifo, "go\n");
  assert.equal(await waitEnded(heldRun), "succeeded");
  releaseEvents();
  await runState(page).and(page.locator("[data-state=succeeded]")).waitFor();
  await page.unroute("**/events");

  step = "retry a dead task and see the new attempt";
  const doomedRun = await trigger("doomed");
  await page.goto(base + "/ui/runs/" + encodeURIComponent(doomedRun));
  await runState(page).and(page.locator("[data-state=failed]")).waitFor();
  await page.click("nav a[data-view=dead]");
  const deadRow = page.locator("[data-testid=dead] tr[data-task]").first();
  await deadRow.waitFor();
  await shot(page, "07-dead");
  await deadRow.locator("[data-testid=retry]").click();
  await page.waitForURL(/\/ui\/runs\/[^/]+$/);
  const retried = decodeURIComponent(new URL(page.url()).pathname.split("/").pop());
  assert.notEqual(retried, doomedRun);
  await runState(page).and(page.locator("[data-state=succeeded]")).waitFor();
  await page.locator("[data-testid=run] a", { hasText: doomedRun.slice(-12) }).waitFor();
  await page.locator(`[data-testid=attempts] tr[data-attempt="1"] [data-state=succeeded]`).waitFor();
  await shot(page, "08-run-retried");
  // The failed run links the run that retried it.
  await page.goto(base + "/ui/runs/" + encodeURIComponent(doomedRun));
  await page.locator("[data-testid=run] a", { hasText: retried.slice(-12) }).waitFor();

  step = "a job's page: its form and its charts per day";
  await page.goto(base + "/ui/jobs/greet");
  await page.locator("[data-testid=start-greet]").waitFor();
  await page.locator('[data-testid=stats] [data-chart="tasks per day"] rect').first().waitFor();
  await page.locator("[data-testid=stats] td", { hasText: /^1$/ }).first().waitFor();
  await shot(page, "10-job-stats");

  step = "the workers page";
  await page.click("nav a[data-view=workers]");
  await page.locator("[data-testid=workers] tr[data-worker=w1] [data-state=live]").waitFor();
  await shot(page, "09-workers");

  assert.deepEqual(problems, [], "the page reported errors");
  console.log("dashboard: every check passed; screenshots in " + artifacts);
} catch (e) {
  console.error("dashboard: failed at step '" + step + "': " + (e && e.stack ? e.stack : e));
  process.exitCode = 1;
  if (page) {
    await shot(page, "failure").catch(() => {});
    console.error("dashboard: page errors: " + JSON.stringify(problems));
    console.error("dashboard: the page at " + page.url() + " said: " + await page.locator("main").innerText().catch(() => "?"));
  }
} finally {
  await browser.close();
}
