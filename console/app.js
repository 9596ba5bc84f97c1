// The Vigil console: every view reads Vigil's own API (/v1/*) with the operator token the sign-in
// kept. No framework and no build step: the file is embedded in the binary as written. Text from
// outside (subjects, jtis, reasons, rule files) only ever becomes text nodes, never markup.
"use strict";

(function () {
  const token = sessionStorage.getItem("vigil-console-token");
  const main = document.getElementById("main");
  let refresh = null; // the current view's live refresh timer
  const DEAD_LETTER_PAGE = 50; // dead letters listed at a time

  // ---- calls -------------------------------------------------------------------------------
  async function api(path, options = {}) {
    const init = { method: options.method || "GET", headers: { authorization: "Bearer " + token } };
    if (options.body !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (e) {
      body = { description: text };
    }
    if (!response.ok) {
      const why = (body && (body.description || body.error)) || response.statusText;
      const error = new Error(response.status + ": " + why);
      error.body = body;
      throw error;
    }
    return body;
  }

  // ---- DOM ---------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "on") {
        for (const [event, handler] of Object.entries(v)) node.addEventListener(event, handler);
      } else if (v !== undefined && v !== null && v !== false) {
        node.setAttribute(k, v === true ? "" : v);
      }
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function table(id, columns, rows) {
    return el(
      "table",
      { id },
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))),
    );
  }

  function failure(e) {
    return el("p", { class: "error", role: "alert" }, String(e.message || e));
  }

  // ISO 8601 with its age: "2026-12-04T06:12:03Z (12 s ago)".
  function when(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const iso = new Date(seconds * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
    const age = Date.now() / 1000 - seconds;
    const abs = Math.abs(age);
    const span =
      abs < 60 ? Math.round(abs) + " s" :
      abs < 3600 ? Math.round(abs / 60) + " min" :
      abs < 86400 ? Math.round(abs / 3600) + " h" : Math.round(abs / 86400) + " d";
    return el("time", { datetime: iso, title: iso }, iso + " (" + (age >= 0 ? span + " ago" : "in " + span) + ")");
  }

  function subjectLink(key) {
    return el("a", { href: "#subject/" + encodeURIComponent(key), class: "subject" }, key);
  }

  function grantLink(id) {
    return el("a", { href: "#grant/" + encodeURIComponent(id), class: "grant" }, id);
  }

  // The nodes of a list, absent ones (`null`: a section with nothing to show) left out.
  function present(list) {
    return list.flat().filter((n) => n !== null && n !== undefined);
  }

  function show(...nodes) {
    if (refresh) {
      clearInterval(refresh);
      refresh = null;
    }
    main.replaceChildren(...present(nodes));
  }

  // ---- views -------------------------------------------------------------------------------
  async function feed() {
    const body = el("tbody", {});
    let cursor = "";
    const status = el("p", { class: "muted" }, "Waiting for signals…");
    show(
      el("h2", {}, "Live feed"),
      el("p", {}, "Signals as they are recorded (a single node: pushed and polled SETs in intake; a cluster: every signal on its signals topic), newest first; refreshed every 2 s."),
      status,
      el("table", { id: "feed" },
        el("thead", {}, el("tr", {}, ["received", "event", "subject", "event time", "issuer", "jti", "source"].map((c) => el("th", {}, c)))),
        body),
    );
    async function poll() {
      try {
        const page = await api("/v1/signals?limit=200" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
        cursor = page.cursor;
        for (const s of page.signals.slice().reverse()) {
          body.insertBefore(
            el("tr", { "data-seq": s.seq },
              el("td", {}, when(s.received_at)), el("td", { class: "event" }, s.event_type),
              el("td", {}, subjectLink(s.subject_key)), el("td", {}, when(s.event_time)),
              el("td", {}, s.iss), el("td", { class: "jti" }, s.jti), el("td", {}, s.source)),
            body.firstChild);
        }
        while (body.children.length > 500) body.removeChild(body.lastChild);
        status.textContent = body.children.length + " signals shown; last checked " + new Date().toISOString();
      } catch (e) {
        status.textContent = "Refresh failed: " + e.message;
      }
    }
    await poll();
    refresh = setInterval(poll, 2000);
  }

  function decisionRows(decisions) {
    return decisions.map((d) => [
      when(d.time), grantLink(d.grant_id), subjectLink(d.subject), d.effect,
      d.previous_status + " → " + d.status, (d.rules || []).join(", "), d.reason,
      d.policy_version, d.cause.kind + (d.cause.jti ? " " + d.cause.jti : ""),
      d.shadow ? "shadow" : "",
    ]);
  }

  const DECISION_COLUMNS = ["time", "grant", "subject", "effect", "status", "rules", "reason", "policy", "cause", ""];

  async function decisions() {
    const form = el("form", { id: "decision-filters", class: "filters" },
      ["rule", "cause", "status", "effect", "policy_version", "subject", "grant"].map((name) =>
        el("label", {}, name, el("input", { name, size: 14 }))),
      el("label", {}, "since", el("input", { name: "since", value: new Date(Date.now() - 86400000).toISOString(), size: 24 })),
      el("button", { type: "submit" }, "Filter"));
    const out = el("div", {});
    const hits = el("div", {});
    async function load() {
      const params = new URLSearchParams();
      for (const input of form.querySelectorAll("input")) if (input.value) params.set(input.name, input.value);
      params.set("limit", "500");
      try {
        const page = await api("/v1/decisions?" + params);
        const list = page.decisions.slice().reverse();
        out.replaceChildren(table("decisions", DECISION_COLUMNS, decisionRows(list)));
        hits.replaceChildren(ruleHits(list));
      } catch (e) {
        out.replaceChildren(failure(e));
      }
    }
    form.addEventListener("submit", (e) => { e.preventDefault(); load(); });
    show(el("h2", {}, "Decisions"), form, el("h3", {}, "Rule hits by hour"), hits, el("h3", {}, "Decisions, newest first"), out);
    await load();
  }

  // Rule hit counts per hour over the decisions listed.
  function ruleHits(list) {
    const hours = new Map();
    const rules = new Set();
    for (const d of list) {
      const hour = new Date(Math.floor(d.time / 3600) * 3600000).toISOString().slice(0, 13) + ":00Z";
      if (!hours.has(hour)) hours.set(hour, new Map());
      for (const r of d.rules || []) {
        rules.add(r);
        hours.get(hour).set(r, (hours.get(hour).get(r) || 0) + 1);
      }
    }
    const ordered = [...rules].sort();
    if (!ordered.length) return el("p", { class: "muted" }, "No rule hits in these decisions.");
    return table("rule-hits", ["hour", ...ordered],
      [...hours.entries()].sort().reverse().map(([hour, counts]) => [hour, ...ordered.map((r) => counts.get(r) || 0)]));
  }

  async function grants() {
    const form = el("form", { id: "grant-filters", class: "filters" },
      el("label", {}, "status", el("select", { name: "status" }, ["", "active", "restricted", "step_up", "revoked"].map((s) => el("option", { value: s }, s || "any")))),
      ["principal", "enforcement_point", "rule"].map((name) => el("label", {}, name, el("input", { name, size: 18 }))),
      el("button", { type: "submit" }, "Filter"));
    const out = el("div", {});
    let after = null;
    async function load(reset) {
      if (reset) after = null;
      const params = new URLSearchParams({ limit: "100" });
      for (const input of form.querySelectorAll("input, select")) if (input.value) params.set(input.name, input.value);
      if (after) params.set("after", after);
      try {
        const page = await api("/v1/grants?" + params);
        const rows = page.grants.map((g) => [grantLink(g.id), subjectLink(g.principal), g.kind, el("span", { class: "status " + g.status }, g.status),
          g.status_reason || "", (g.enforcement_points || []).join(", "), when(g.expires_at)]);
        out.replaceChildren(...present([table("grants", ["grant", "principal", "kind", "status", "reason", "enforcement points", "expires"], rows),
          page.next ? el("button", { on: { click: () => { after = page.next; load(false); } } }, "Next page") : null]));
      } catch (e) {
        out.replaceChildren(failure(e));
      }
    }
    form.addEventListener("submit", (e) => { e.preventDefault(); load(true); });
    show(el("h2", {}, "Grants"), form, out);
    await load(true);
  }

  // A context's facts with their provenance: `{name: {value…, time, source, seq}}` trees.
  function facts(context) {
    const rows = [];
    function walk(path, v) {
      if (v && typeof v === "object" && !Array.isArray(v)) {
        if ("time" in v && "source" in v) {
          const { time, source, seq, ...rest } = v;
          rows.push([path, JSON.stringify(rest.value !== undefined ? rest.value : rest), when(time), source, seq]);
          return;
        }
        for (const [k, child] of Object.entries(v)) walk(path ? path + "." + k : k, child);
      } else if (v !== null && v !== undefined && path !== "key" && path !== "version") {
        rows.push([path, JSON.stringify(v), "", "", ""]);
      }
    }
    walk("", context || {});
    return rows.length ? table("facts", ["fact", "value", "event time", "source", "seq"], rows) : el("p", { class: "muted" }, "No facts.");
  }

  function explained(x) {
    const held = x.grants || {};
    const grantsOf = (held.active || []).concat(held.revoked || []);
    return [
      el("h3", {}, "Context"), facts(x.context),
      el("h3", {}, "Grants"),
      grantsOf.length ? table("subject-grants", ["grant", "kind", "status", "reason"], grantsOf.map((g) => [grantLink(g.id), g.kind, g.status, g.status_reason || ""])) : el("p", { class: "muted" }, "No grants."),
      el("h3", {}, "Recent signals"),
      table("subject-signals", ["event", "event time", "source", "jti", "changed"], (x.recent_signals || []).map((s) => [s.event_type, when(s.event_time), s.source, s.jti, s.changed ? "yes" : "no"])),
      el("h3", {}, "Decisions"),
      table("subject-decisions", DECISION_COLUMNS, decisionRows((x.recent_decisions || []).slice().reverse())),
    ];
  }

  async function subject(key) {
    const input = el("input", { id: "subject-search", name: "q", placeholder: "email, phone, opaque id or key", size: 40, value: key || "" });
    const results = el("div", { id: "subject-results" });
    const detail = el("div", { id: "subject-detail" });
    async function open(k) {
      try {
        const x = await api("/v1/subjects/" + encodeURIComponent(k));
        detail.replaceChildren(el("h3", {}, "Subject ", el("code", { id: "subject-key" }, x.subject || k)),
          el("p", {}, "Identifiers: ", (x.identifiers || []).join(", ")), ...explained(x));
      } catch (e) {
        detail.replaceChildren(failure(e));
      }
    }
    async function search() {
      try {
        const found = await api("/v1/subjects?q=" + encodeURIComponent(input.value));
        results.replaceChildren(found.subjects.length
          ? table("subject-matches", ["identifier", "principal"], found.subjects.map((s) => [
            el("a", { href: "#subject/" + encodeURIComponent(s.principal) }, s.key), s.principal]))
          : el("p", { class: "muted" }, "No subject matches."));
        if (found.subjects.length === 1) await open(found.subjects[0].principal);
      } catch (e) {
        results.replaceChildren(failure(e));
      }
    }
    const form = el("form", { id: "subject-form", class: "filters", on: { submit: (e) => { e.preventDefault(); search(); } } },
      el("label", {}, "Find a subject ", input), el("button", { type: "submit" }, "Search"));
    show(el("h2", {}, "Subjects"), form, results, detail);
    if (key) await open(key);
  }

  async function grant(id) {
    show(el("h2", {}, "Grant ", el("code", {}, id)));
    try {
      const x = await api("/v1/grants/" + encodeURIComponent(id) + "/explain");
      const g = x.grant;
      main.append(
        table("grant-detail", ["", ""], [["status", g.status], ["reason", g.status_reason || ""], ["principal", subjectLink(g.principal)],
          ["kind", g.kind], ["issued", when(g.issued_at)], ["expires", when(g.expires_at)], ["registered", when(g.registered_at)],
          ["enforcement points", (g.enforcement_points || []).join(", ")], ["scopes", (g.scopes || []).join(", ")]]),
        ...explained(x.subject || x));
    } catch (e) {
      main.append(failure(e));
    }
  }

  async function streams() {
    show(el("h2", {}, "Inbound streams"), el("p", {}, "Vigil's streams at its transmitters: status, last event (how far behind a quiet stream may be), last verification."));
    try {
      const x = await api("/v1/ssf/streams");
      const ms = (v) => (v ? when(v / 1000) : "—");
      main.append(table("streams", ["transmitter", "stream", "status", "delivery", "last event", "last verified", "problem"],
        x.streams.map((s) => {
          const l = s.liveness || {};
          return [s.transmitter, s.stream, l.status || "unknown", l.delivery || "", ms(l.last_event_ms), ms(l.last_verified_ms), l.error || l.reason || ""];
        })));
    } catch (e) {
      main.append(failure(e));
    }
  }

  async function eps() {
    show(el("h2", {}, "Enforcement points"));
    try {
      const x = await api("/v1/enforcement-points");
      const rows = [];
      for (const ep of x.enforcement_points) {
        if (!ep.streams.length) rows.push([ep.name, "no stream", "", "", "", "", ""]);
        for (const s of ep.streams) {
          rows.push([ep.name, s.stream_id, s.method + (s.endpoint_url ? " " + s.endpoint_url : ""), s.status,
            when(s.last_verification_at), s.outstanding + (s.outstanding_more ? "+" : ""), s.dead_letters]);
        }
      }
      main.append(table("enforcement-points", ["enforcement point", "stream", "delivery", "status", "last verified", "outstanding", "dead letters"], rows));
      // Dead letters a page at a time, oldest first; "More" goes on from the last page's cursor.
      const row = (d) => [d.stream_id, d.outgoing.jti, d.error, when(d.dead_at_ms / 1000)];
      const dead = await api("/v1/deadletters?limit=" + DEAD_LETTER_PAGE);
      let listed = dead.dead_letters.length;
      let next = dead.next;
      const heading = el("h3", { id: "dead-letters-heading" });
      const title = (total) => { heading.textContent = "Dead letters" + (listed < total ? ` (the oldest ${listed} of ${total})` : ` (${total})`); };
      title(dead.total);
      const letters = table("dead-letters", ["stream", "jti", "error", "dead since"], dead.dead_letters.map(row));
      const more = el("button", { id: "more-dead-letters", on: { click: async () => {
        try {
          const page = await api("/v1/deadletters?limit=" + DEAD_LETTER_PAGE + "&after=" + encodeURIComponent(next));
          const body = letters.querySelector("tbody");
          for (const d of page.dead_letters) body.append(el("tr", {}, row(d).map((c) => el("td", {}, c))));
          listed += page.dead_letters.length;
          next = page.next;
          title(page.total);
          more.hidden = !next;
        } catch (e) {
          main.append(failure(e));
        }
      } } }, "More");
      more.hidden = !next;
      main.append(heading, letters, more,
        el("button", { id: "replay-dead-letters", on: { click: async () => {
          try {
            const r = await api("/v1/deadletters/replay", { method: "POST", body: {} });
            main.append(el("p", { class: "ok", id: "replayed" }, "Queued again: " + r.replayed +
              (r.skipped ? `; ${r.skipped} left (their stream was deleted or is disabled)` : "") +
              (r.deferred ? `; ${r.deferred} deferred (their stream's outbox is full: replay again once its receiver has read)` : "")));
          } catch (e) {
            main.append(failure(e));
          }
        } } }, "Replay dead letters"));
    } catch (e) {
      main.append(failure(e));
    }
  }

  // ---- policies: running set, candidate, impact / replay / shadow as diff tables -------------
  function diffTable(id, rows) {
    return table(id, ["", "count"], rows);
  }

  function renderImpact(x) {
    return [
      el("h3", {}, "Impact preview"),
      diffTable("impact-counts", [["evaluated", x.evaluated], ["unchanged", x.unchanged], ["changed", x.changed],
        ["loosening", x.loosening], ["errors", x.errors], ["revoked (not evaluated)", x.revoked]]),
      table("impact-transitions", ["from", "to", "grants"], (x.transitions || []).map((t) => [t.from, t.to, t.count])),
      table("impact-rules", ["rule", "grants changed"], (x.by_rule || []).map((r) => [r.rule, r.count])),
      ...["changed", "loosening", "errors"].map((bucket) => {
        const samples = (x.samples && x.samples[bucket]) || [];
        return samples.length ? table("impact-" + bucket, [bucket + ": grant", "subject", "from", "to"],
          samples.map((s) => [grantLink(s.grant_id), subjectLink(s.subject), s.from, s.to])) : null;
      }),
    ];
  }

  function renderReplay(x) {
    const m = x.not_reconstructed;
    const step = (s) => (s ? s.to + " [" + s.rules.join(", ") + "]" : "nothing");
    return [
      el("h3", {}, "Replay since ", when(x.since)),
      diffTable("replay-counts", [["signals replayed", x.signals], ["live decisions", x.live_decisions],
        ["candidate decisions", x.candidate_decisions], ["added", x.added], ["removed", x.removed], ["changed", x.changed]]),
      table("replay-rules", ["rule", "added", "removed", "changed"], Object.entries(x.by_rule).map(([r, c]) => [r, c.added, c.removed, c.changed])),
      ...["added", "removed", "changed"].map((bucket) => x.samples[bucket].length ? table("replay-" + bucket, [bucket + ": grant", "cause", "live", "candidate"],
        x.samples[bucket].map((s) => [grantLink(s.grant_id), s.signal ? s.signal.jti : "registration", step(s.live), step(s.candidate)])) : null),
      el("h4", {}, "Not reconstructed"),
      diffTable("replay-missing", [["recorded decisions", m.recorded], ["made again by the live set", m.reproduced], ["not made again", m.unreproduced],
        ["facts unknown at the window's start", m.facts_unknown_at_start], ["facts of unrecorded (Kafka) signals", m.unrecorded_signal_facts],
        ["decisions on grants no longer held", m.grants_gone]]),
    ];
  }

  function renderShadow(x, reload) {
    if (!x) return [el("p", { class: "muted", id: "no-shadow" }, "No shadow set is loaded.")];
    const d = x.divergences;
    return [
      el("p", {}, "Shadow set ", el("code", { id: "shadow-version" }, x.version), " loaded ", when(x.loaded_at), ": ",
        el("strong", { id: "shadow-divergences" }, d.total + " divergences"), " (" + d.stricter + " stricter, " + d.looser + " looser)"),
      table("shadow-rules", ["rule", "stricter", "looser"], Object.entries(d.by_rule).map(([r, c]) => [r, c.stricter || 0, c.looser || 0])),
      el("div", { id: "shadow-list" }),
      el("button", { id: "shadow-refresh", on: { click: reload } }, "Refresh"),
      el("button", { id: "shadow-promote", on: { click: async () => {
        try {
          const r = await api("/v1/policies/shadow/promote", { method: "POST", body: {} });
          main.querySelector("#policy-result").replaceChildren(el("p", { class: "ok", id: "promoted" }, "Promoted: " + r.status + " " + (r.version || "") + (r.changed !== undefined ? ", " + r.changed + " grants changed" : "")));
          await policies();
        } catch (e) {
          main.querySelector("#policy-result").replaceChildren(failure(e));
        }
      } } }, "Promote"),
      el("button", { id: "shadow-discard", on: { click: async () => {
        await api("/v1/policies/shadow", { method: "DELETE" }).catch(() => {});
        await policies();
      } } }, "Discard"),
    ];
  }

  async function policies() {
    let running;
    try {
      running = await api("/v1/policies");
    } catch (e) {
      show(el("h2", {}, "Policies"), failure(e));
      return;
    }
    const r = running.running;
    const files = Object.entries(r.sources || {});
    const [firstName, firstText] = files.length ? files[0] : ["rules.yaml", "rules: []\n"];
    const name = el("input", { id: "candidate-name", value: firstName.replace(/^builtin:/, ""), size: 30 });
    const text = el("textarea", { id: "candidate-text", rows: 18, cols: 100, spellcheck: "false" });
    text.value = firstText;
    const result = el("div", { id: "policy-result" });
    const shadowBox = el("div", { id: "shadow" });
    const since = el("input", { id: "replay-since", value: "24h", size: 6 });
    const candidate = () => {
      const out = {};
      for (const [n, t] of files) if (n.replace(/^builtin:/, "") !== name.value) out[n.replace(/^builtin:/, "")] = t;
      out[name.value] = text.value;
      return out;
    };
    const run = (label, action) => async () => {
      result.replaceChildren(el("p", { class: "muted" }, label + "…"));
      try {
        result.replaceChildren(...present(await action()));
      } catch (e) {
        result.replaceChildren(failure(e));
      }
    };
    async function loadShadow() {
      let x = null;
      try {
        x = await api("/v1/policies/shadow");
      } catch (e) {
        x = null;
      }
      shadowBox.replaceChildren(...renderShadow(x, loadShadow));
      if (x) {
        const list = await api("/v1/policies/shadow/divergences?limit=50");
        shadowBox.querySelector("#shadow-list").replaceChildren(table("divergences", ["time", "grant", "subject", "direction", "live", "shadow", "rule", "signal"],
          list.divergences.map((d) => [when(d.time), grantLink(d.grant_id), subjectLink(d.subject), d.direction,
            d.live.status, d.shadow.status, d.rule, d.cause.jti || d.cause.kind])));
      }
    }
    show(
      el("h2", {}, "Policies"),
      el("p", {}, "Running set ", el("code", { id: "running-version" }, r.version), " from ", r.files.join(", ")),
      table("running-rules", ["rule", "on", "effect", "mode", "when", "file"], r.rules.map((rule) => [rule.id, (rule.on || []).join(", "), rule.effect, rule.mode || "enforce", rule.when, rule.file])),
      el("h3", {}, "Candidate"),
      el("p", {}, "Edit one rule file of the set (the others stay as they run); preview it, replay it, or run it as a shadow set."),
      el("label", {}, "File ", name), el("br", {}), text, el("br", {}),
      el("button", { id: "run-impact", on: { click: run("Previewing", async () => renderImpact(await api("/v1/policies/impact", { method: "POST", body: { files: candidate(), samples: 10 } }))) } }, "Preview impact"),
      el("label", {}, " since ", since),
      el("button", { id: "run-replay", on: { click: run("Replaying", async () => renderReplay(await api("/v1/policies/replay", { method: "POST", body: { files: candidate(), since: since.value, samples: 10 } }))) } }, "Replay"),
      el("button", { id: "load-shadow", on: { click: run("Loading", async () => {
        await api("/v1/policies/shadow", { method: "PUT", body: { files: candidate() } });
        await loadShadow();
        return [el("p", { class: "ok" }, "Loaded as the shadow set: every evaluation now runs it too, never enforced.")];
      }) } }, "Load as shadow"),
      result,
      el("h3", {}, "Shadow set"), shadowBox,
    );
    await loadShadow();
  }

  // ---- routing -----------------------------------------------------------------------------
  async function route() {
    const [view, arg] = location.hash.replace(/^#/, "").split("/");
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("current", a.dataset.view === (view === "grant" ? "grants" : view || "feed"));
    const key = arg ? decodeURIComponent(arg) : "";
    switch (view) {
      case "decisions": return decisions();
      case "grants": return grants();
      case "grant": return grant(key);
      case "subject": return subject(key);
      case "streams": return streams();
      case "eps": return eps();
      case "policies": return policies();
      default: return feed();
    }
  }

  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  document.body.classList.add("signed-in");
  window.addEventListener("hashchange", route);
  route();
})();
