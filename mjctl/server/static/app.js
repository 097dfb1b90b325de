// mjctl's task page. Reads GET /api/user/self (who is signed in, the balance), GET /api/mj/self or, for
// admins, GET /api/mj/ with GET /api/admin/users and /api/admin/channels for the names behind the ids.
// The Statistics view reads GET /api/mj/stats/charts (the numbers and the charts, SVG
// drawn and escaped by the server, parsed as XML and placed without running anything); the tables of the
// top users and channels are read from their charts' data attributes.
// Every piece of task text reaches the page through textContent or a checked URL, never through innerHTML.
"use strict";

(function () {
  const TOKEN_KEY = "mjctl.token";
  const PAGE_SIZE_KEY = "mjctl.pageSize";
  const PAGE_SIZES = [10, 20, 50, 100];
  const DEFAULT_PAGE_SIZE = 20;
  const REFRESH_MS = 3000;
  const LONG_SECONDS = 300; // a task taking longer than this is marked: Midjourney jobs take a minute or two
  const FINISHED = new Set(["SUCCESS", "FAILURE", "CANCEL"]);
  // The listing's parameters that live in the page's address, so reload and back/forward keep them.
  const URL_FILTERS = ["mj_id", "user_id", "channel_id", "status", "action", "start_timestamp", "end_timestamp"];
  const NUMBER = new Intl.NumberFormat("en-US");
  const VIEWS = ["tasks", "stats"];
  const PERIODS = [7, 30, 90]; // the Statistics view's periods, in UTC days ending today
  const DEFAULT_PERIOD = 7;
  const DAY = 86400;
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Upstream messages (midjourney-proxy answers in Chinese), shown in English; the original stays in the
  // API and in the element's title. [pattern, English text or a function of the match].
  const MESSAGES = [
    [/^任务超时$/, "Task timed out"],
    [/^执行超时\s*(\d+)\s*分钟$/, (m) => `Timed out after ${m[1]} minutes`],
    [/^排队中，前面还有(\d+)个任务$/, (m) => `Queued, ${m[1]} task${m[1] === "1" ? "" : "s"} ahead`],
    [/^队列已满$/, "Queue full"],
    [/^队列已满，请稍后尝试$/, "Queue full, try again later"],
    [/^可能包含敏感词$/, "May contain banned words"],
    [/^提交成功$/, "Submitted"],
    [/^成功$/, "Success"],
    [/^窗口等待$/, "Waiting for the modal's input"],
    [/^任务不存在$/, "Task not found"],
    [/^关联任务不存在或已失效$/, "The related task does not exist or has expired"],
    [/^任务状态错误$/, "The task is in the wrong state"],
    [/^关联任务状态错误$/, "The related task is in the wrong state"],
    [/^base64格式错误$/, "Malformed base64"],
    [/^([A-Za-z0-9]+)不能为空$/, (m) => `${m[1]} must not be empty`],
    [/^([A-Za-z0-9]+)参数错误$/, (m) => `Invalid ${m[1]} parameter`],
    [/^请求体必须是JSON对象$/, "The request body must be a JSON object"],
  ];

  const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
  const el = {
    who: $("who"), accountName: $("account-name"), balance: $("balance"), role: $("role"), signOut: $("sign-out"),
    signin: $("signin"), signinForm: $("signin-form"), token: $("token"), message: $("message"),
    announce: $("announce"), tasks: $("tasks"), filtersToggle: $("filters-toggle"), filters: $("filters"),
    userFilter: $("filter-user"), userError: $("user-error"), userSuggestions: $("user-suggestions"), channelFilter: $("filter-channel"),
    rows: $("task-rows"), prev: $("prev"), next: $("next"), pageInfo: $("page-info"), pageSize: $("page-size"),
    live: $("live"), lightbox: $("lightbox"), lightboxImage: $("lightbox-image"), lightboxVideo: $("lightbox-video"),
    lightboxPrompt: $("lightbox-prompt"), lightboxId: $("lightbox-id"), lightboxLink: $("lightbox-link"),
    lightboxClose: $("lightbox-close"), views: $("views"), stats: $("stats"), statsPeriod: $("stats-period"),
    statsScope: $("stats-scope"), statsRefresh: $("stats-refresh"),
  };

  const state = {
    token: null,
    account: null, // GET /api/user/self
    role: null, // "admin" | "user" once the server said which
    page: 1,
    pageSize: DEFAULT_PAGE_SIZE,
    filters: {},
    timer: null,
    request: null, // the AbortController of the listing in flight
    generation: 0, // counts loads, so only the latest one renders
    channels: null, // Map id -> {name, enabled}, admins only
    users: new Map(), // id -> name, admins only
    opener: null, // what opened the lightbox, to give focus back
    view: "tasks", // "tasks" | "stats", from the address
    period: DEFAULT_PERIOD, // days the Statistics view covers
    statsGeneration: 0, // counts statistics loads, so only the latest one renders
  };

  // --- talking to the server -------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  class NetworkError extends Error {}
  class FilterError extends Error {}

  // The listing request is the one a newer one replaces (abortable); the small look-ups run beside it.
  // A chart (svg) answers an SVG document on success and the JSON envelope on failure.
  async function getJSON(path, params = {}, { abortable = false } = {}) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
    }
    let controller = null;
    if (abortable) {
      if (state.request) state.request.abort();
      controller = state.request = new AbortController();
    }
    let response;
    try {
      response = await fetch(query.size ? `${path}?${query}` : path, {
        headers: { Authorization: `Bearer ${state.token}`, Accept: "application/json" },
        cache: "no-store",
        signal: controller ? controller.signal : undefined,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new NetworkError("The server cannot be reached.");
    } finally {
      if (controller && state.request === controller) state.request = null;
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok || !body || body.success !== true) {
      const message = body && typeof body.message === "string" && body.message
        ? body.message : `The server answered ${response.status} ${response.statusText}.`;
      throw new HttpError(response.status, message);
    }
    return body.data;
  }

  function listingParams() {
    const params = { p: state.page, page_size: state.pageSize, ...state.filters };
    if (state.role !== "admin") { delete params.channel_id; delete params.user_id; }
    return params;
  }

  async function fetchAccount() {
    const account = await getJSON("api/user/self");
    state.account = account;
    setRole(account.role === "admin" || account.role === "root" ? "admin" : "user");
    return account;
  }

  async function fetchChannels() {
    const data = await getJSON("api/admin/channels");
    state.channels = new Map(data.items.map((c) => [c.id, c]));
    fillChannelFilter();
  }

  // Names for the user ids on the page that are not known yet; a failure leaves them shown as ids.
  async function fetchUserNames(ids) {
    const missing = [...new Set(ids)].filter((id) => !state.users.has(id));
    if (missing.length === 0) return;
    try {
      const data = await getJSON("api/admin/users", { ids: missing.join(",") });
      for (const user of data.items) state.users.set(user.id, user.name);
    } catch (err) {
      if (err.name === "AbortError") throw err;
    }
  }

  // --- loading and refreshing ------------------------------------------------------------------------

  function refresh() {
    return state.view === "stats" ? loadStats() : load();
  }

  async function load() {
    stopTimer();
    if (!state.token || state.view !== "tasks") return;
    const generation = ++state.generation; // a newer load (a click, a refresh) makes this one stale
    let data;
    try {
      if (!state.account) await fetchAccount();
      else fetchAccount().catch(() => {}); // the balance moves as tasks are charged and refunded
      if (state.role === "admin" && !state.channels) await fetchChannels();
      const path = state.role === "admin" ? "api/mj/" : "api/mj/self";
      data = await getJSON(path, listingParams(), { abortable: true });
      if (state.role === "admin") {
        const ids = data.items.map((item) => item.user_id);
        if (state.filters.user_id) ids.push(Number(state.filters.user_id));
        await fetchUserNames(ids);
        const id = state.filters.user_id;
        if (id && el.userFilter.value === `#${id}` && state.users.has(Number(id))) showUserFilter();
      }
    } catch (err) {
      if (err.name === "AbortError" || generation !== state.generation) return;
      handleFailure(err);
      return;
    }
    if (generation !== state.generation) return;
    const lastPage = Math.max(1, Math.ceil(data.total / data.page_size));
    if (data.items.length === 0 && data.total > 0 && state.page > lastPage) {
      state.page = lastPage; // the list shrank under us
      writeUrl(false);
      return load();
    }
    state.page = data.page;
    render(data);
    const running = data.items.some((item) => !FINISHED.has(item.status));
    el.live.hidden = !running;
    if (running) scheduleRefresh();
  }

  function handleFailure(err) {
    if (err instanceof HttpError && (err.status === 401 || (err.status === 403 && !state.account))) {
      // This token will not work however often we retry: back to the sign-in form.
      const stored = state.token;
      signOut();
      showMessage("error", `Your token was not accepted (${err.status}): ${err.message}`);
      el.token.value = stored || "";
      return;
    }
    if (state.view === "stats") {
      showMessage("error", err instanceof NetworkError ? "Cannot reach the mjctl server."
        : `The server could not compute the statistics (${err.status || "error"}): ${err.message}`);
      return; // the Refresh button tries again
    }
    if (err instanceof NetworkError) {
      showMessage("error", "Cannot reach the mjctl server. Retrying every few seconds…");
    } else if (err instanceof HttpError) {
      showMessage("error", `The server could not list the tasks (${err.status}): ${err.message}`);
    } else {
      showMessage("error", `Something went wrong: ${err.message}`);
    }
    scheduleRefresh(); // the server may come back; the next refresh will clear the message
  }

  function scheduleRefresh() {
    stopTimer();
    state.timer = setTimeout(load, REFRESH_MS);
  }

  function stopTimer() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
  }

  // --- rendering -------------------------------------------------------------------------------------

  function setRole(role) {
    state.role = role;
    el.role.textContent = role === "admin" ? "Admin · all tasks" : "User · your tasks";
    el.role.classList.toggle("admin", role === "admin");
    for (const node of document.querySelectorAll(".admin-only")) node.hidden = role !== "admin";
    el.accountName.textContent = state.account ? state.account.name : "";
    el.balance.textContent = state.account ? `Balance ${NUMBER.format(state.account.quota)}` : "";
    el.balance.hidden = !state.account;
  }

  function render(data) {
    const columns = el.rows.closest("table").querySelectorAll("thead th:not([hidden])").length;
    const rows = data.items.map(taskRow);
    if (rows.length === 0) {
      const filtered = Object.keys(state.filters).length > 0;
      const empty = cell("td", filtered ? "No tasks match these filters." : "No tasks yet.", "empty");
      empty.colSpan = columns;
      empty.dataset.testid = "empty";
      const tr = document.createElement("tr");
      tr.append(empty);
      rows.push(tr);
      showMessage("info", filtered ? "No tasks match these filters; change or reset them."
        : "There are no tasks yet. Submit one through the API and it will appear here.");
    } else {
      hideMessage();
    }
    keepFocus(() => el.rows.replaceChildren(...rows));

    const pages = Math.max(1, Math.ceil(data.total / data.page_size));
    el.pageInfo.textContent = `Page ${data.page} of ${pages} · ${data.total} task${data.total === 1 ? "" : "s"}`;
    el.prev.disabled = data.page <= 1;
    el.next.disabled = data.page >= pages;
  }

  // Live refreshes rebuild the rows: put the keyboard focus back on the same control of the same task.
  function keepFocus(rebuild) {
    const active = document.activeElement;
    const row = active && el.rows.contains(active) ? active.closest("tr") : null;
    rebuild();
    if (!row || !active.dataset.testid) return;
    const selector = `tr[data-row-id="${row.dataset.rowId}"] [data-testid="${active.dataset.testid}"]`;
    const again = el.rows.querySelector(selector);
    if (again) again.focus();
  }

  function taskRow(item) {
    const tr = document.createElement("tr");
    tr.dataset.testid = "task-row";
    tr.dataset.mjId = item.mj_id;
    tr.dataset.rowId = String(item.id);
    tr.append(timeCell(item.submit_time));
    tr.append(durationCell(item));
    if (state.role === "admin") {
      const user = cell("td", state.users.get(item.user_id) || `#${item.user_id}`, "user", "user", "User");
      user.dataset.userId = String(item.user_id);
      const channel = state.channels && state.channels.get(item.channel_id);
      tr.append(user, cell("td", channel ? channel.name : `#${item.channel_id}`, "channel", "channel", "Channel"));
    }
    // Admins see the speed a task was submitted for (item.mode, admin listing only) beside its action.
    const action = item.mode ? `${item.action || ""} · ${item.mode.toLowerCase()}` : (item.action || "");
    tr.append(cell("td", action, "action", "action", "Action"));
    tr.append(idCell(item));
    tr.append(statusCell(item));
    tr.append(imageCell(item));
    tr.append(cell("td", item.prompt || "", "prompt", "prompt", "Prompt"));
    const english = item.prompt_en && item.prompt_en !== item.prompt ? item.prompt_en : "";
    const promptEn = cell("td", english || (item.prompt_en ? "same" : "—"), "prompt-en", "prompt-en", "English");
    if (!english) promptEn.classList.add("muted");
    tr.append(promptEn);
    tr.append(cell("td", NUMBER.format(Number(item.quota) || 0), "number cost", "cost", "Cost"));
    tr.append(reasonCell(item.fail_reason));
    return tr;
  }

  function cell(tag, text, className, testid, label) {
    const node = document.createElement(tag);
    node.textContent = text;
    if (className) node.className = className;
    if (testid) node.dataset.testid = testid;
    if (label) node.dataset.label = label;
    return node;
  }

  function timeCell(seconds) {
    const td = cell("td", "", "time", "submitted", "Submitted");
    if (!seconds) { td.textContent = "—"; return td; }
    const [day, clock] = formatTime(seconds).split(" ");
    const time = document.createElement("time");
    time.dateTime = new Date(seconds * 1000).toISOString();
    time.append(cell("span", day, "day"), " ", cell("span", clock, "clock"));
    td.append(time);
    return td;
  }

  function durationCell(item) {
    const spans = durations(item, Math.floor(Date.now() / 1000));
    const td = cell("td", "", "duration", "duration-cell", "Duration");
    const value = cell("span", spans ? formatSeconds(spans.total) : "—", "value", "duration");
    td.append(value);
    if (!spans) return td;
    td.title = spans.detail;
    td.append(cell("span", spans.detail, "detail", "duration-detail"));
    if (spans.total >= LONG_SECONDS) {
      td.classList.add("long");
      td.dataset.long = "true";
      value.prepend(cell("span", "slow", "tag"), " ");
    }
    return td;
  }

  function idCell(item) {
    const td = cell("td", "", "mj", null, "Task id");
    const copy = cell("button", "Copy", "secondary copy", "copy-id");
    copy.type = "button";
    copy.setAttribute("aria-label", `Copy task id ${item.mj_id}`);
    copy.addEventListener("click", () => copyId(item.mj_id, copy));
    td.append(cell("code", item.mj_id, "mono", "mj-id"), copy);
    return td;
  }

  function statusCell(item) {
    const td = cell("td", "", "state", null, "Status");
    const percent = item.status === "SUCCESS" ? 100 : parsePercent(item.progress);
    td.append(cell("span", item.status || "", `status s-${safeClass(item.status)}`, "status"));
    const wrap = document.createElement("div");
    wrap.className = "progress";
    wrap.dataset.testid = "progress";
    const track = document.createElement("div");
    track.className = "track";
    track.setAttribute("role", "progressbar");
    track.setAttribute("aria-label", `Progress of task ${item.mj_id}`);
    track.setAttribute("aria-valuemin", "0");
    track.setAttribute("aria-valuemax", "100");
    track.setAttribute("aria-valuenow", String(percent));
    const bar = document.createElement("div");
    bar.className = "bar";
    if (item.status === "SUCCESS") bar.classList.add("done");
    if (item.status === "FAILURE" || item.status === "CANCEL") bar.classList.add("failed");
    bar.style.width = `${percent}%`;
    track.append(bar);
    wrap.append(track, cell("span", `${percent}%`, "label", "progress-label"));
    td.append(wrap);
    return td;
  }

  /** The task's first video: video_url, else the first of video_urls (a JSON-array string). */
  function videoOf(item) {
    if (item.video_url) return safeUrl(item.video_url);
    try {
      const urls = JSON.parse(item.video_urls || "[]");
      return Array.isArray(urls) && urls.length ? safeUrl(urls[0]) : null;
    } catch (err) {
      return null;
    }
  }

  function imageCell(item) {
    const td = cell("td", "", "image", null, "Image");
    const url = safeUrl(item.image_url);
    const video = videoOf(item);
    if (!url && video) {  // a video without a still: a button that plays it
      const play = document.createElement("button");
      play.type = "button";
      play.className = "thumb play";
      play.textContent = "▶ Video";
      play.dataset.testid = "thumbnail";
      play.addEventListener("click", () => openLightbox(null, item, play));
      td.append(play);
      return td;
    }
    if (!url) {
      td.classList.add("none");
      td.append(cell("span", "no image", "noimage"));
      return td;
    }
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.title = video ? "Play the video" : "Open the full image";
    if (video) button.classList.add("has-video");
    button.dataset.testid = "thumbnail";
    const img = document.createElement("img");
    img.alt = `Image of task ${item.mj_id}`;
    img.loading = "lazy";
    img.src = url;
    img.addEventListener("error", () => button.replaceWith(cell("span", "unavailable", "noimage")));
    button.append(img);
    button.addEventListener("click", () => openLightbox(url, item, button));
    td.append(button);
    return td;
  }

  function reasonCell(reason) {
    const td = cell("td", "", reason ? "reason" : "reason none", null, reason ? "Failure" : "");
    const { text, original } = translate(reason || "");
    td.append(cell("span", text, "text", "fail-reason"));
    if (original) {
      td.title = original;
      const source = cell("span", original, "original", "fail-reason-original");
      source.lang = "zh";
      td.append(source);
    }
    return td;
  }

  function showMessage(kind, text) {
    el.message.className = `message ${kind}`;
    el.message.dataset.kind = kind;
    el.message.textContent = text;
    el.message.hidden = false;
  }

  function hideMessage() {
    el.message.hidden = true;
    el.message.textContent = "";
  }

  function announce(text) {
    el.announce.textContent = text;
  }


  // --- the Statistics view ---------------------------------------------------------------------------

  // The period: whole UTC days, the last `period` of them, today included (the server's day groups are UTC).
  function statsParams() {
    const today = Math.floor(Date.now() / 1000 / DAY) * DAY;
    return { start_timestamp: today - (state.period - 1) * DAY };
  }

  async function loadStats() {
    stopTimer();
    if (!state.token || state.view !== "stats") return;
    const generation = ++state.statsGeneration;
    const params = statsParams();
    let days;
    try {
      if (!state.account) await fetchAccount();
      else fetchAccount().catch(() => {});
      const admin = state.role === "admin";
      // One request per layout: the day charts (their statistics computed once, and returned for the
      // numbers too) and, for admins, the top users and channels, laid out for their own boxes.
      const nodes = [...el.stats.querySelectorAll(".chart")];
      const sets = [nodes.filter((node) => !node.closest(".admin-only"))];
      if (admin) sets.push(nodes.filter((node) => node.closest(".admin-only")));
      const answers = await Promise.all(sets.map((set) => getJSON("api/mj/stats/charts",
        { ...params, charts: set.map((node) => node.dataset.chart).join(","), width: chartWidth(set[0]) })));
      if (generation !== state.statsGeneration) return;
      sets.forEach((set, i) => set.forEach((node) => placeChart(node, answers[i].charts[node.dataset.chart])));
      days = answers[0].stats.day;
    } catch (err) {
      if (err.name === "AbortError" || generation !== state.statsGeneration) return;
      handleFailure(err);
      return;
    }
    hideMessage();
    renderStats(days);
  }

  // The width the chart is laid out for: its box on the page (the server accepts 240 to 2400).
  function chartWidth(node) {
    return Math.max(240, Math.min(2400, Math.round(node.clientWidth || node.parentElement.clientWidth || 640)));
  }

  // The server's SVG, parsed as XML (nothing in it runs) and taken only if it is an SVG document.
  function placeChart(node, text) {
    const doc = new DOMParser().parseFromString(text, "image/svg+xml");
    const svg = doc.documentElement;
    if (svg.namespaceURI !== SVG_NS || svg.localName !== "svg" || doc.getElementsByTagName("parsererror").length) {
      throw new Error("the server sent a chart that is not an SVG image");
    }
    for (const script of svg.getElementsByTagName("script")) script.remove();
    node.replaceChildren(document.importNode(svg, true));
  }

  // A rate as a percentage with one decimal, halves rounded up from its four decimals (0.8125 is 81.3%),
  // the same rule as the server's charts and the CLI.
  const pct = (rate) => {
    if (rate === null || rate === undefined) return "—";
    const tenths = Math.floor((Math.round(rate * 10000) + 5) / 10);
    return `${Math.floor(tenths / 10)}.${tenths % 10}%`;
  };
  const secs = (value) => (value === null || value === undefined ? "—" : formatSeconds(Math.round(value)));
  const spent = (s) => (Number(s.quota_charged) || 0) - (Number(s.quota_refunded) || 0);

  function renderStats(days) {
    const t = days.totals;
    const admin = state.role === "admin";
    const first = days.groups.length ? days.groups[0].key : "", last = days.groups.length ? days.groups[days.groups.length - 1].key : "";
    el.statsScope.textContent = `${admin ? "All tasks" : "Your tasks"}, UTC days ${first} to ${last}`
      + `${days.percentiles === "sampled" ? " (percentiles from a sample)" : ""}.`;
    $("total-tasks").textContent = NUMBER.format(t.tasks);
    $("total-success-rate").textContent = pct(t.success_rate);
    $("total-quota").textContent = NUMBER.format(spent(t));
    $("total-run").textContent = `${secs(t.run_seconds_p50)} / ${secs(t.run_seconds_p95)}`;
    $("total-queue").textContent = `${secs(t.queue_seconds_p50)} / ${secs(t.queue_seconds_p95)}`;
    const dayRow = (s, label, tag) => {
      const tr = document.createElement("tr");
      const head = cell("th", label);
      head.scope = "row";
      tr.append(head);
      for (const text of [NUMBER.format(s.tasks), NUMBER.format(s.success), NUMBER.format(s.failure),
        NUMBER.format(s.cancel), NUMBER.format(s.unfinished), pct(s.success_rate), secs(s.run_seconds_p50),
        secs(s.run_seconds_p95), secs(s.queue_seconds_p50), secs(s.queue_seconds_p95), NUMBER.format(spent(s))]) {
        tr.append(cell(tag, text, "number"));
      }
      return tr;
    };
    $("days-rows").replaceChildren(...[...days.groups].reverse().map((g) => {
      const tr = dayRow(g, g.key, "td");
      tr.dataset.testid = "day-row";
      tr.dataset.key = g.key;
      return tr;
    }));
    const total = dayRow(t, "Total", "td");
    total.dataset.testid = "day-total";
    $("days-total").replaceChildren(total);
    if (admin) {
      rankRows($("users-rows"), el.stats.querySelector('.chart[data-chart="users"]'));
      rankRows($("channels-rows"), el.stats.querySelector('.chart[data-chart="channels"]'));
    }
  }

  // The users or channels of either ranking (the first ten by tasks, the first ten by quota spent), by tasks:
  // read from the chart's own rows (their data attributes), so no one asks for every user's statistics.
  function rankRows(body, chart) {
    const rows = new Map();
    for (const g of chart.querySelectorAll("g[data-by] > g[data-key]")) rows.set(g.getAttribute("data-key"), g);
    const shown = [...rows.values()].sort((a, b) => Number(b.getAttribute("data-tasks")) - Number(a.getAttribute("data-tasks")));
    body.replaceChildren(...shown.map((g) => {
      const tr = document.createElement("tr");
      tr.dataset.testid = "rank-row";
      tr.dataset.key = g.getAttribute("data-key");
      const head = cell("th", g.getAttribute("data-name"));
      head.scope = "row";
      const rate = g.getAttribute("data-rate");
      tr.append(head, cell("td", NUMBER.format(Number(g.getAttribute("data-tasks"))), "number"),
        cell("td", pct(rate === "" ? null : Number(rate)), "number"),
        cell("td", NUMBER.format(Number(g.getAttribute("data-spent"))), "number"));
      return tr;
    }));
    if (shown.length === 0) {
      const td = cell("td", "Nothing in this period.", "empty");
      td.colSpan = 4;
      const tr = document.createElement("tr");
      tr.append(td);
      body.replaceChildren(tr);
    }
  }

  function clearStats() {
    for (const node of el.stats.querySelectorAll(".chart, tbody, tfoot")) node.replaceChildren();
    for (const node of el.stats.querySelectorAll("dd")) node.textContent = "—";
    el.statsScope.textContent = "";
  }

  // The view switch: links (the keyboard and the address work as for any link), the current one marked.
  function showView() {
    el.tasks.hidden = state.view !== "tasks";
    el.stats.hidden = state.view !== "stats";
    for (const link of el.views.querySelectorAll("a")) {
      if (link.dataset.view === state.view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    el.statsPeriod.value = String(state.period);
    if (state.view !== "tasks") el.live.hidden = true;
  }

  // --- the lightbox: a modal dialog that keeps the focus until it closes -----------------------------

  function openLightbox(url, item, opener) {
    state.opener = { rowId: String(item.id), node: opener };
    const video = videoOf(item);
    el.lightboxImage.hidden = Boolean(video);
    el.lightboxVideo.hidden = !video;
    if (video) {  // a video task plays in the dialog, its still as the poster
      el.lightboxVideo.src = video;
      if (url) el.lightboxVideo.poster = url; else el.lightboxVideo.removeAttribute("poster");
      el.lightboxVideo.setAttribute("aria-label", `Video of task ${item.mj_id}`);
    } else {
      el.lightboxImage.src = url;
      el.lightboxImage.alt = `Image of task ${item.mj_id}`;
    }
    el.lightboxPrompt.textContent = item.prompt || item.prompt_en || "(no prompt)";
    el.lightboxId.textContent = item.mj_id;
    el.lightboxLink.href = video || url;
    el.lightbox.showModal();
    el.lightboxClose.focus();
  }

  function closeLightbox() {
    if (el.lightbox.open) el.lightbox.close();
  }

  function lightboxClosed() {
    el.lightboxImage.removeAttribute("src");
    el.lightboxVideo.pause();
    el.lightboxVideo.removeAttribute("src");
    el.lightboxVideo.load();
    const opener = state.opener;
    state.opener = null;
    if (!opener) return;
    // The rows may have been rebuilt by a refresh while the dialog was open: find the same task's thumbnail.
    const node = opener.node.isConnected ? opener.node
      : el.rows.querySelector(`tr[data-row-id="${opener.rowId}"] [data-testid="thumbnail"]`);
    if (node) node.focus();
  }

  function trapFocus(event) {
    if (event.key !== "Tab") return;
    const focusable = [...el.lightbox.querySelectorAll("video[controls]:not([hidden]), a[href], button:not([disabled])")];
    if (focusable.length === 0) return;
    const first = focusable[0], last = focusable[focusable.length - 1];
    const inside = el.lightbox.contains(document.activeElement);
    if (event.shiftKey && (document.activeElement === first || !inside)) {
      event.preventDefault();
      last.focus();
    } else if (!event.shiftKey && (document.activeElement === last || !inside)) {
      event.preventDefault();
      first.focus();
    }
  }

  async function copyId(mjId, button) {
    let copied = false;
    try {
      await navigator.clipboard.writeText(mjId);
      copied = true;
    } catch (err) {
      copied = copyBySelection(mjId); // plain http on another host: no Clipboard API
    }
    button.textContent = copied ? "Copied" : "Copy failed";
    announce(copied ? `Copied task id ${mjId}` : `Could not copy task id ${mjId}`);
    setTimeout(() => { if (button.isConnected) button.textContent = "Copy"; }, 1500);
  }

  function copyBySelection(text) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    let done = false;
    try { done = document.execCommand("copy"); } catch (err) { done = false; }
    area.remove();
    return done;
  }

  // --- formatting ------------------------------------------------------------------------------------

  function translate(text) {
    const trimmed = text.trim();
    for (const [pattern, english] of MESSAGES) {
      const match = pattern.exec(trimmed);
      if (match) return { text: typeof english === "function" ? english(match) : english, original: text };
    }
    return { text, original: null };
  }

  function parsePercent(progress) {
    const value = parseFloat(String(progress || "").replace("%", ""));
    if (!Number.isFinite(value)) return 0;
    return Math.max(0, Math.min(100, Math.round(value)));
  }

  function safeClass(status) {
    return String(status || "").replace(/[^A-Z_]/gi, "");
  }

  // Only http(s) and same-origin URLs become links or images (never javascript: or data: from a task).
  function safeUrl(value) {
    if (!value || typeof value !== "string") return null;
    try {
      const url = new URL(value, window.location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (err) {
      return null;
    }
  }

  const pad = (n) => String(n).padStart(2, "0");

  function formatTime(seconds) {
    const d = new Date(seconds * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
      + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function formatSeconds(total) {
    const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
    if (h) return `${h}h ${pad(m)}m`;
    if (m) return `${m}m ${pad(s)}s`;
    return `${s}s`;
  }

  // A task's time counts from its submission, so it never jumps back when the task leaves the queue:
  // total = finish (or now, while unfinished) - submit; the queue and run parts go in the detail.
  function durations(item, now) {
    const submit = item.submit_time, start = item.start_time, finish = item.finish_time;
    if (!submit) return null;
    const finished = FINISHED.has(item.status);
    const end = finish || (finished ? 0 : now);
    if (!end) return null;
    const total = Math.max(0, end - submit);
    let detail;
    if (start) {
      const queued = formatSeconds(Math.max(0, start - submit)), ran = formatSeconds(Math.max(0, end - start));
      detail = finish ? `queued ${queued}, ran ${ran}` : `queued ${queued}, running for ${ran}`;
    } else {
      detail = finish ? `finished ${formatSeconds(total)} after submission` : `queued for ${formatSeconds(total)}`;
    }
    return { total, detail };
  }

  function localInput(ms) {
    return formatTime(Math.floor(ms / 1000)).replace(" ", "T");
  }

  // --- filters, the address, paging, sign-in ---------------------------------------------------------

  function fillChannelFilter() {
    const wanted = state.filters.channel_id || "";
    const options = [cell("option", "any")];
    options[0].value = "";
    for (const channel of [...state.channels.values()]) {
      const option = cell("option", channel.enabled ? channel.name : `${channel.name} (disabled)`);
      option.value = String(channel.id);
      options.push(option);
    }
    if (wanted && !state.channels.has(Number(wanted))) { // a removed channel named in the address
      const option = cell("option", `#${wanted} (removed)`);
      option.value = wanted;
      options.push(option);
    }
    el.channelFilter.replaceChildren(...options);
    el.channelFilter.value = wanted;
  }

  // The user filter shows the applied filter's name ("#12" until the name is known); what an admin is
  // typing is left alone.
  function showUserFilter() {
    const id = state.filters.user_id;
    el.userFilter.value = id ? state.users.get(Number(id)) || `#${id}` : "";
  }

  let suggestTimer = null;
  function suggestUsers() {
    clearTimeout(suggestTimer);
    const text = el.userFilter.value.trim();
    if (!text || text.startsWith("#")) return;
    suggestTimer = setTimeout(async () => {
      try {
        const data = await getJSON("api/admin/users", { q: text });
        el.userSuggestions.replaceChildren(...data.items.map((user) => {
          const option = document.createElement("option");
          option.value = user.name;
          return option;
        }));
      } catch (err) { /* suggestions are a convenience */ }
    }, 200);
  }

  // The user filter names a user; the listing wants the id. "#12" is taken as the id itself.
  async function resolveUser(text) {
    if (!text) return null;
    const byId = /^#(\d+)$/.exec(text);
    if (byId) return byId[1];
    for (const [id, name] of state.users) if (name === text) return String(id);
    const data = await getJSON("api/admin/users", { q: text });
    const user = data.items.find((u) => u.name === text);
    if (!user) throw new FilterError(`No user is named "${text}".`);
    state.users.set(user.id, user.name);
    return String(user.id);
  }

  async function readFilters() {
    const form = new FormData(el.filters);
    const filters = {};
    for (const name of ["mj_id", "status", "action"]) {
      const value = String(form.get(name) || "").trim();
      if (value) filters[name] = value;
    }
    if (state.role === "admin") {
      const channel = String(form.get("channel_id") || "");
      if (channel) filters.channel_id = channel;
      const user = await resolveUser(String(form.get("user") || "").trim());
      if (user) filters.user_id = user;
    }
    // datetime-local is local time; the API takes milliseconds as well as seconds.
    const start = String(form.get("start") || "");
    const end = String(form.get("end") || "");
    if (start) filters.start_timestamp = String(new Date(start).getTime());
    if (end) filters.end_timestamp = String(new Date(end).getTime() + (end.length <= 16 ? 59999 : 999));
    return filters;
  }

  // The form shows state.filters (after a reload, or back and forward).
  function showFilters() {
    const f = state.filters;
    el.filters.elements.mj_id.value = f.mj_id || "";
    for (const name of ["status", "action"]) {
      const select = el.filters.elements[name];
      if (f[name] && ![...select.options].some((o) => o.value === f[name])) select.append(cell("option", f[name]));
      select.value = f[name] || "";
    }
    el.filters.elements.start.value = f.start_timestamp ? localInput(Number(f.start_timestamp)) : "";
    el.filters.elements.end.value = f.end_timestamp ? localInput(Number(f.end_timestamp)) : "";
    if (state.channels) fillChannelFilter();
    showUserFilter();
    const active = Object.keys(f).length;
    el.filtersToggle.textContent = active ? `Filters (${active})` : "Filters";
  }

  function readUrl() {
    const query = new URLSearchParams(window.location.search);
    const filters = {};
    for (const name of URL_FILTERS) {
      const value = (query.get(name) || "").trim();
      if (value) filters[name] = value;
    }
    state.filters = filters;
    const page = Number(query.get("p"));
    state.page = Number.isInteger(page) && page > 0 ? page : 1;
    const size = Number(query.get("page_size")) || Number(localStorage.getItem(PAGE_SIZE_KEY));
    state.pageSize = PAGE_SIZES.includes(size) ? size : DEFAULT_PAGE_SIZE;
    el.pageSize.value = String(state.pageSize);
    state.view = VIEWS.includes(query.get("view")) ? query.get("view") : "tasks";
    const days = Number(query.get("days"));
    state.period = PERIODS.includes(days) ? days : DEFAULT_PERIOD;
    showFilters();
    if (state.token) showView();
  }

  // Filters, page and page size go into the address: a new history entry for each change the user makes.
  function writeUrl(push = true) {
    const query = new URLSearchParams();
    for (const name of URL_FILTERS) if (state.filters[name]) query.set(name, state.filters[name]);
    if (state.page > 1) query.set("p", String(state.page));
    if (state.pageSize !== DEFAULT_PAGE_SIZE) query.set("page_size", String(state.pageSize));
    if (state.view !== "tasks") query.set("view", state.view);
    if (state.view === "stats" && state.period !== DEFAULT_PERIOD) query.set("days", String(state.period));
    const search = query.toString() ? `?${query}` : "";
    if (search === window.location.search) return;
    const url = window.location.pathname + search;
    if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
  }

  function go(changes) {
    Object.assign(state, changes);
    writeUrl();
    showFilters();
    showView();
    refresh();
  }

  function narrow() {
    return window.matchMedia("(max-width: 640px)").matches;
  }

  function setFiltersOpen(open) {
    el.filters.classList.toggle("expanded", open);
    el.filtersToggle.setAttribute("aria-expanded", String(open));
  }

  function signIn(token) {
    state.token = token;
    state.account = null;
    state.role = null;
    state.channels = null;
    state.users = new Map();
    localStorage.setItem(TOKEN_KEY, token);
    el.signin.hidden = true;
    el.views.hidden = false;
    showView();
    el.who.hidden = false;
    el.role.textContent = "Signing in…";
    el.accountName.textContent = "";
    el.balance.hidden = true;
    el.rows.replaceChildren();
    hideMessage();
    refresh();
  }

  function signOut() {
    stopTimer();
    state.generation += 1;
    state.statsGeneration += 1;
    if (state.request) state.request.abort();
    localStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.account = null;
    state.role = null;
    el.tasks.hidden = true;
    el.stats.hidden = true;
    el.views.hidden = true;
    clearStats(); // the next person at this browser sees nothing of the last one's figures
    el.who.hidden = true;
    el.live.hidden = true;
    el.rows.replaceChildren();
    el.signin.hidden = false;
    el.token.value = "";
    hideMessage();
  }

  el.signinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = el.token.value.trim();
    if (token) signIn(token);
  });
  el.signOut.addEventListener("click", () => { signOut(); el.token.focus(); });
  el.filters.addEventListener("submit", async (event) => {
    event.preventDefault();
    let filters;
    try {
      filters = await readFilters();
    } catch (err) {
      if (!(err instanceof FilterError)) {
        showMessage("error", `The filters could not be read: ${err.message}`);
        return;
      }
      el.userError.textContent = err.message;
      el.userError.hidden = false;
      el.userFilter.setAttribute("aria-invalid", "true");
      el.userFilter.focus();
      return;
    }
    if (narrow()) setFiltersOpen(false);
    go({ filters, page: 1 });
  });
  el.filters.addEventListener("reset", () => {
    setTimeout(() => go({ filters: {}, page: 1 }), 0); // after the form has cleared
  });
  el.filtersToggle.addEventListener("click", () => {
    setFiltersOpen(el.filtersToggle.getAttribute("aria-expanded") !== "true");
  });
  el.userFilter.addEventListener("input", () => {
    el.userError.hidden = true;
    el.userFilter.removeAttribute("aria-invalid");
    suggestUsers();
  });
  for (const button of document.querySelectorAll('[data-testid="refresh"]')) button.addEventListener("click", load);
  el.prev.addEventListener("click", () => { if (state.page > 1) go({ page: state.page - 1 }); });
  el.next.addEventListener("click", () => go({ page: state.page + 1 }));
  el.pageSize.addEventListener("change", () => {
    const size = Number(el.pageSize.value);
    localStorage.setItem(PAGE_SIZE_KEY, String(size));
    go({ pageSize: size, page: 1 });
  });
  window.addEventListener("popstate", () => { readUrl(); refresh(); });
  for (const link of el.views.querySelectorAll("a")) {
    link.addEventListener("click", (event) => {
      if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return; // a new tab or window
      event.preventDefault();
      if (link.dataset.view !== state.view) go({ view: link.dataset.view });
    });
  }
  el.statsPeriod.addEventListener("change", () => go({ period: Number(el.statsPeriod.value) }));
  el.statsRefresh.addEventListener("click", loadStats);
  el.lightboxClose.addEventListener("click", closeLightbox);
  el.lightbox.addEventListener("click", (event) => { if (event.target === el.lightbox) closeLightbox(); });
  el.lightbox.addEventListener("keydown", trapFocus);
  el.lightbox.addEventListener("close", lightboxClosed);

  readUrl();
  const saved = localStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved); else signOut();
})();
