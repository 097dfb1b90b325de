// mjctl's task page. Talks only to GET /api/mj/ (admin) and GET /api/mj/self; every piece of task text
// reaches the page through textContent or a checked URL, never through innerHTML.
"use strict";

(function () {
  const TOKEN_KEY = "mjctl.token";
  const PAGE_SIZE_KEY = "mjctl.pageSize";
  const REFRESH_MS = 3000;
  const FINISHED = new Set(["SUCCESS", "FAILURE", "CANCEL"]);

  const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
  const el = {
    who: $("who"), role: $("role"), signOut: $("sign-out"), signin: $("signin"), signinForm: $("signin-form"),
    token: $("token"), message: $("message"), tasks: $("tasks"), filters: $("filters"), rows: $("task-rows"),
    prev: $("prev"), next: $("next"), pageInfo: $("page-info"), pageSize: $("page-size"), live: $("live"),
    refresh: $("refresh"), lightbox: $("lightbox"), lightboxImage: $("lightbox-image"),
    lightboxLink: $("lightbox-link"), lightboxClose: $("lightbox-close"),
  };

  const state = {
    token: null,
    role: null, // "admin" | "user" once the server said which
    page: 1,
    pageSize: 20,
    filters: {},
    timer: null,
    request: null, // the AbortController of the load in flight
  };

  // --- talking to the server -------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  class NetworkError extends Error {}

  async function getJSON(path, params) {
    const query = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
    }
    if (state.request) state.request.abort();
    const controller = new AbortController();
    state.request = controller;
    let response;
    try {
      response = await fetch(`${path}?${query}`, {
        headers: { Authorization: `Bearer ${state.token}`, Accept: "application/json" },
        cache: "no-store",
        signal: controller.signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new NetworkError("The server cannot be reached.");
    } finally {
      if (state.request === controller) state.request = null;
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
    if (state.role !== "admin") delete params.channel_id;
    return params;
  }

  // The role is not known until the server answers: try the admin listing first, a 403 means "user".
  async function fetchPage() {
    if (state.role !== "user") {
      try {
        const data = await getJSON("api/mj/", listingParams());
        setRole("admin");
        return data;
      } catch (err) {
        if (!(err instanceof HttpError && err.status === 403 && state.role === null)) throw err;
      }
    }
    const data = await getJSON("api/mj/self", listingParams());
    setRole("user");
    return data;
  }

  // --- loading and refreshing ------------------------------------------------------------------------

  async function load() {
    stopTimer();
    if (!state.token) return;
    let data;
    try {
      data = await fetchPage();
    } catch (err) {
      if (err.name === "AbortError") return;
      handleFailure(err);
      return;
    }
    const lastPage = Math.max(1, Math.ceil(data.total / data.page_size));
    if (data.items.length === 0 && data.total > 0 && state.page > lastPage) {
      state.page = lastPage; // the list shrank under us
      return load();
    }
    state.page = data.page;
    render(data);
    const running = data.items.some((item) => !FINISHED.has(item.status));
    el.live.hidden = !running;
    if (running) scheduleRefresh();
  }

  function handleFailure(err) {
    if (err instanceof HttpError && (err.status === 401 || (err.status === 403 && state.role === null))) {
      // This token will not work however often we retry: back to the sign-in form.
      const stored = state.token;
      signOut();
      showMessage("error", `Your token was not accepted (${err.status}): ${err.message}`);
      el.token.value = stored || "";
      return;
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
  }

  function render(data) {
    const columns = state.role === "admin" ? 10 : 9;
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
    el.rows.replaceChildren(...rows);

    const pages = Math.max(1, Math.ceil(data.total / data.page_size));
    el.pageInfo.textContent = `Page ${data.page} of ${pages} · ${data.total} task${data.total === 1 ? "" : "s"}`;
    el.prev.disabled = data.page <= 1;
    el.next.disabled = data.page >= pages;
  }

  function taskRow(item) {
    const tr = document.createElement("tr");
    tr.dataset.testid = "task-row";
    tr.dataset.mjId = item.mj_id;
    tr.append(cell("td", formatTime(item.submit_time), "time"));
    tr.append(cell("td", formatDuration(item), "duration"));
    if (state.role === "admin") tr.append(cell("td", String(item.channel_id), "mono", "channel"));
    tr.append(cell("td", item.action || ""));
    tr.append(cell("td", item.mj_id, "mono", "mj-id"));

    const status = cell("span", item.status || "", `status s-${safeClass(item.status)}`, "status");
    const statusCell = document.createElement("td");
    statusCell.append(status);
    tr.append(statusCell);

    tr.append(progressCell(item));
    tr.append(imageCell(item));
    const prompt = cell("td", item.prompt || item.prompt_en || "", "prompt", "prompt");
    prompt.title = item.prompt_en && item.prompt_en !== item.prompt ? item.prompt_en : "";
    tr.append(prompt);
    tr.append(cell("td", item.fail_reason || "", "reason", "fail-reason"));
    return tr;
  }

  function cell(tag, text, className, testid) {
    const node = document.createElement(tag);
    node.textContent = text;
    if (className) node.className = className;
    if (testid) node.dataset.testid = testid;
    return node;
  }

  function progressCell(item) {
    const percent = item.status === "SUCCESS" ? 100 : parsePercent(item.progress);
    const td = document.createElement("td");
    const wrap = document.createElement("div");
    wrap.className = "progress";
    wrap.dataset.testid = "progress";
    const track = document.createElement("div");
    track.className = "track";
    track.setAttribute("role", "progressbar");
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

  function imageCell(item) {
    const td = document.createElement("td");
    const url = safeUrl(item.image_url);
    if (!url) {
      td.append(cell("span", "—", "noimage"));
      return td;
    }
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.title = "Open the full image";
    button.dataset.testid = "thumbnail";
    const img = document.createElement("img");
    img.alt = `Image of task ${item.mj_id}`;
    img.loading = "lazy";
    img.src = url;
    img.addEventListener("error", () => button.replaceWith(cell("span", "unavailable", "noimage")));
    button.append(img);
    button.addEventListener("click", () => openLightbox(url, item.mj_id));
    td.append(button);
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

  function openLightbox(url, mjId) {
    el.lightboxImage.src = url;
    el.lightboxImage.alt = `Image of task ${mjId}`;
    el.lightboxLink.href = url;
    el.lightbox.hidden = false;
  }

  function closeLightbox() {
    el.lightbox.hidden = true;
    el.lightboxImage.removeAttribute("src");
  }

  // --- formatting ------------------------------------------------------------------------------------

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
    if (!seconds) return "—";
    const d = new Date(seconds * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
      + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function formatDuration(item) {
    const begin = item.start_time || item.submit_time;
    if (!begin) return "—";
    let end = item.finish_time;
    if (!end) {
      if (FINISHED.has(item.status)) return "—";
      end = Math.floor(Date.now() / 1000); // still running: time so far
    }
    const total = Math.max(0, end - begin);
    const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
    if (h) return `${h}h ${pad(m)}m`;
    if (m) return `${m}m ${pad(s)}s`;
    return `${s}s`;
  }

  // --- filters, paging, sign-in ----------------------------------------------------------------------

  function readFilters() {
    const form = new FormData(el.filters);
    const filters = {};
    for (const name of ["mj_id", "status", "action"]) {
      const value = String(form.get(name) || "").trim();
      if (value) filters[name] = value;
    }
    const channel = String(form.get("channel_id") || "").trim();
    if (channel && state.role === "admin") filters.channel_id = channel;
    // datetime-local is local time; the API takes milliseconds as well as seconds.
    const start = String(form.get("start") || "");
    const end = String(form.get("end") || "");
    if (start) filters.start_timestamp = new Date(start).getTime();
    if (end) filters.end_timestamp = new Date(end).getTime() + (end.length <= 16 ? 59999 : 999);
    return filters;
  }

  function signIn(token) {
    state.token = token;
    state.role = null;
    state.page = 1;
    localStorage.setItem(TOKEN_KEY, token);
    el.signin.hidden = true;
    el.tasks.hidden = false;
    el.who.hidden = false;
    el.role.textContent = "Signing in…";
    el.rows.replaceChildren();
    hideMessage();
    load();
  }

  function signOut() {
    stopTimer();
    if (state.request) state.request.abort();
    localStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.role = null;
    el.tasks.hidden = true;
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
  el.filters.addEventListener("submit", (event) => {
    event.preventDefault();
    state.filters = readFilters();
    state.page = 1;
    load();
  });
  el.filters.addEventListener("reset", () => {
    setTimeout(() => { state.filters = {}; state.page = 1; load(); }, 0); // after the form has cleared
  });
  el.refresh.addEventListener("click", () => load());
  el.prev.addEventListener("click", () => { if (state.page > 1) { state.page -= 1; load(); } });
  el.next.addEventListener("click", () => { state.page += 1; load(); });
  el.pageSize.addEventListener("change", () => {
    state.pageSize = Number(el.pageSize.value);
    localStorage.setItem(PAGE_SIZE_KEY, String(state.pageSize));
    state.page = 1;
    load();
  });
  el.lightboxClose.addEventListener("click", closeLightbox);
  el.lightbox.addEventListener("click", (event) => { if (event.target === el.lightbox) closeLightbox(); });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") closeLightbox(); });

  const savedSize = Number(localStorage.getItem(PAGE_SIZE_KEY));
  if ([10, 20, 50, 100].includes(savedSize)) {
    state.pageSize = savedSize;
    el.pageSize.value = String(savedSize);
  }
  const saved = localStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved); else signOut();
})();
