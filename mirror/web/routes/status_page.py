"""The status page's one document: HTML, CSS and the script that draws /status.json.

Every value goes into the page with ``textContent`` or as an SVG attribute set from a
number: nothing from the JSON is ever parsed as markup.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mirror status</title>
<style>
  :root { --ink: #1d2330; --muted: #6b7385; --line: #e3e6ee; --card: #ffffff;
          --bg: #f4f6fa; --ok: #1f9d55; --bad: #d64545; --warn: #d69e2e; --hit: #3b82f6; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
         color: var(--ink); background: var(--bg); }
  header { display: flex; align-items: baseline; gap: 16px; padding: 18px 28px;
           background: var(--ink); color: #fff; }
  header h1 { margin: 0; font-size: 20px; letter-spacing: .5px; }
  header .meta { color: #c5cad6; }
  .badge { padding: 2px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
  .badge.offline { background: var(--warn); color: #231a00; }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(330px, 1fr));
         gap: 18px; padding: 22px 28px; max-width: 1400px; }
  section { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
            padding: 16px 18px; }
  section.wide { grid-column: 1 / -1; }
  h2 { margin: 0 0 10px; font-size: 13px; text-transform: uppercase; letter-spacing: .8px;
       color: var(--muted); }
  .big { font-size: 28px; font-weight: 650; }
  .figures { display: flex; gap: 28px; flex-wrap: wrap; }
  .figure .label { color: var(--muted); font-size: 12px; }
  table { width: 100%; border-collapse: collapse; }
  th, td { text-align: left; padding: 5px 6px; border-bottom: 1px solid var(--line);
           vertical-align: top; }
  th { color: var(--muted); font-weight: 500; font-size: 12px; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .state { font-weight: 600; }
  .state.ok { color: var(--ok); } .state.bad { color: var(--bad); }
  .state.unknown { color: var(--muted); } .state.offline { color: var(--warn); }
  .bar { height: 10px; background: var(--line); border-radius: 5px; overflow: hidden;
         margin: 6px 0 2px; }
  .bar > div { height: 100%; background: var(--hit); }
  .muted { color: var(--muted); }
  svg text { font-size: 10px; fill: var(--muted); }
  footer { padding: 0 28px 22px; color: var(--muted); font-size: 12px; }
  .error { color: var(--bad); }
</style>
</head>
<body>
<header>
  <h1>mirror</h1>
  <span class="meta" id="version"></span>
  <span class="meta" id="uptime"></span>
  <span id="offline"></span>
</header>
<main>
  <section>
    <h2>Requests</h2>
    <div class="figures">
      <div class="figure"><div class="big" id="hit-hour">-</div>
        <div class="label">hit ratio, last hour</div></div>
      <div class="figure"><div class="big" id="req-hour">-</div>
        <div class="label">requests, last hour</div></div>
      <div class="figure"><div class="big" id="hit-start">-</div>
        <div class="label">hit ratio since start</div></div>
      <div class="figure"><div class="big" id="req-start">-</div>
        <div class="label">requests since start</div></div>
    </div>
  </section>
  <section>
    <h2>Traffic</h2>
    <div class="figures">
      <div class="figure"><div class="big" id="bytes-cache">-</div>
        <div class="label">served from cache</div></div>
      <div class="figure"><div class="big" id="bytes-upstream">-</div>
        <div class="label">fetched upstream</div></div>
      <div class="figure"><div class="big" id="saved">-</div>
        <div class="label">upstream pulls saved</div></div>
    </div>
    <div class="bar"><div id="cache-share" style="width: 0%"></div></div>
    <div class="label muted">share of blob bytes served from cache</div>
  </section>
  <section>
    <h2>Disk</h2>
    <div class="label muted" id="storage"></div>
    <div class="figures">
      <div class="figure"><div class="big" id="disk-used">-</div>
        <div class="label" id="disk-budget">cached blobs</div></div>
      <div class="figure"><div class="big" id="disk-free">-</div>
        <div class="label">free on the filesystem</div></div>
    </div>
    <div class="bar"><div id="disk-share" style="width: 0%"></div></div>
    <div class="label muted" id="disk-share-label"></div>
  </section>
  <section class="wide">
    <h2>Last hour: requests per minute (blue: from cache)</h2>
    <svg id="chart" width="100%" height="120" viewBox="0 0 600 120"
         preserveAspectRatio="none" role="img" aria-label="requests per minute"></svg>
    <div class="label muted" id="chart-label"></div>
  </section>
  <section>
    <h2>Upstreams</h2>
    <table><thead><tr><th>registry</th><th>URL</th><th>state</th><th class="num">quota left</th>
      <th class="num">retry after</th></tr></thead><tbody id="upstreams"></tbody></table>
  </section>
  <section>
    <h2>Most pulled images</h2>
    <table><thead><tr><th>image</th><th class="num">pulls</th></tr></thead>
      <tbody id="images"></tbody></table>
  </section>
  <section class="wide">
    <h2>Last upstream errors</h2>
    <table><thead><tr><th>when</th><th>upstream</th><th>kind</th><th>error</th></tr></thead>
      <tbody id="errors"></tbody></table>
  </section>
</main>
<footer>Refreshes every 10 seconds. The same data as JSON: <a href="status.json">status.json</a>.
  <span id="problem" class="error"></span></footer>
<script>
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
function text(id, value) { $(id).textContent = value; }
function size(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(bytes), unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return (unit ? value.toFixed(1) : value.toFixed(0)) + " " + units[unit];
}
function ratio(value) { return value === null ? "-" : (100 * value).toFixed(1) + "%"; }
function count(value) { return Number(value).toLocaleString("en-US"); }
function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600),
        m = Math.floor(seconds % 3600 / 60);
  if (d) return d + "d " + h + "h";
  return h ? h + "h " + m + "m" : m + "m " + Math.floor(seconds % 60) + "s";
}
function rows(id, items, cells) {
  const body = $(id);
  body.replaceChildren();
  if (!items.length) {
    const row = body.insertRow(), cell = row.insertCell();
    cell.colSpan = 4; cell.className = "muted"; cell.textContent = "none";
    return;
  }
  for (const item of items) {
    const row = body.insertRow();
    for (const [value, klass] of cells(item)) {
      const cell = row.insertCell();
      cell.textContent = value;
      if (klass) cell.className = klass;
    }
  }
}
function chart(points) {
  const svg = $("chart");
  svg.replaceChildren();
  const width = 600, height = 120, top = 8;
  const most = Math.max(1, ...points.map((p) => p.requests));
  const slot = width / Math.max(points.length, 60);
  points.forEach((point, index) => {
    const x = index * slot + 1, w = Math.max(slot - 2, 1);
    for (const [value, color] of [[point.requests, "#cbd5e1"], [point.hits, "#3b82f6"]]) {
      const h = (height - top) * value / most;
      const bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("x", x); bar.setAttribute("width", w);
      bar.setAttribute("y", height - h); bar.setAttribute("height", h);
      bar.setAttribute("fill", color);
      svg.appendChild(bar);
    }
  });
  text("chart-label", points.length ? "tallest bar: " + count(most) + " requests in a minute"
                                    : "no sample yet");
}
function draw(s) {
  text("version", "version " + s.version);
  text("uptime", "up " + duration(s.uptime_seconds));
  const offline = $("offline");
  offline.textContent = s.offline ? "offline" : "";
  offline.className = s.offline ? "badge offline" : "";
  text("hit-hour", ratio(s.last_hour.hit_ratio));
  text("req-hour", count(s.last_hour.requests));
  text("hit-start", ratio(s.since_start.hit_ratio));
  text("req-start", count(s.since_start.requests));
  text("bytes-cache", size(s.since_start.bytes_from_cache));
  text("bytes-upstream", size(s.since_start.bytes_from_upstream));
  text("saved", count(s.since_start.upstream_pulls_saved));
  const served = s.since_start.bytes_from_cache + s.since_start.bytes_from_upstream;
  $("cache-share").style.width = (served ? 100 * s.since_start.bytes_from_cache / served : 0) + "%";
  const disk = s.disk;
  text("storage", disk.storage ? "blobs in bucket " + disk.storage.bucket + " at "
       + disk.storage.endpoint + " (" + disk.storage.state + "); free space: the spool's" : "");
  text("disk-used", size(disk.used));
  text("disk-budget", disk.budget ? "cached blobs, of a " + size(disk.budget) + " budget"
                                  : "cached blobs (no budget set)");
  text("disk-free", size(disk.free));
  const room = disk.budget || disk.total || 0;
  const share = room && disk.used ? Math.min(100, 100 * disk.used / room) : 0;
  $("disk-share").style.width = share + "%";
  text("disk-share-label", room ? ratio(disk.used / room) + " of the "
       + (disk.budget ? "budget" : "filesystem") + " used" : "");
  chart(s.chart);
  rows("upstreams", Object.entries(s.upstreams), ([name, u]) => {
    const state = u.reachable === true ? ["reachable", "state ok"]
      : u.reachable === false ? ["circuit open", "state bad"]
      : u.reachable === "offline" ? ["offline", "state offline"]
      : ["not asked yet", "state unknown"];
    return [[name, ""], [u.url, "muted"], state,
            [u.ratelimit_remaining === null ? "-" : count(u.ratelimit_remaining), "num"],
            [u.retry_after ? u.retry_after + " s" : "-", "num"]];
  });
  rows("images", s.top_images, (i) => [[i.image, ""], [count(i.pulls), "num"]]);
  rows("errors", s.upstream_errors, (e) => [
    [new Date(e.at * 1000).toLocaleString(), ""], [e.upstream, ""], [e.kind, ""], [e.error, ""]]);
}
async function refresh() {
  try {
    const answer = await fetch("status.json", {cache: "no-store"});
    if (!answer.ok) throw new Error("status.json answered " + answer.status);
    draw(await answer.json());
    text("problem", "");
    document.body.dataset.loaded = "yes";
  } catch (error) {
    text("problem", "Could not refresh: " + error.message);
  }
}
refresh();
setInterval(refresh, 10000);
</script>
</body>
</html>
"""
