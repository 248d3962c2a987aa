/* The chat page (templates/pages/chat/session.html): send a message and stream its reply.

   The turn goes straight to the API: POST /api/v1/chat/sessions/<id>/messages/ with
   Accept: text/event-stream (session auth, Django's CSRF token), read with fetch and a
   ReadableStream as server-sent events: `message` (the assistant message as it starts),
   `delta` ({"text": ...}) per piece of text, `settlement` (the settled message), last.
   Refusals come before the stream, as JSON {"error": {code, message, kind, fields?}}.

   Stop aborts the fetch. The server keeps reading the reply to its end and settles it anyway,
   so the page then asks for the message as the server shows it (/chat/<id>/messages/<id>/,
   204 while it still streams) until it has settled. Every settled turn is swapped in from that
   partial, the same template the page is rendered with, and the header's credits refresh
   (the `rivya:changed` event, see rivya/pages/common.py). No build step, no framework. */
(() => {
  "use strict";
  const form = document.getElementById("chat-form");
  if (!form) return;
  const log = document.getElementById("chat-log");
  const content = document.getElementById("id_content");
  const maxTokens = document.getElementById("id_max_tokens");
  const send = document.getElementById("chat-send");
  const stop = document.getElementById("chat-stop");
  const notice = document.getElementById("chat-notice");
  const live = document.getElementById("chat-live");
  const specs = JSON.parse(document.getElementById("chat-params").textContent);
  const POLL_MS = 500;
  const POLL_FOR_MS = 15 * 60 * 1000; // longer than any turn may run (CHAT_TURN_MAX_SECONDS)

  let running = null; // the turn being streamed: {controller, stopped, ...}

  // --- small helpers ----------------------------------------------------------------------

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  const csrfToken = () => {
    const input = form.querySelector("[name=csrfmiddlewaretoken]");
    if (input) return input.value;
    try {
      return JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRFToken"];
    } catch (error) {
      return "";
    }
  };

  // The header (credits, bell) refreshes on this event, as after any htmx action.
  const changed = () => document.body.dispatchEvent(new CustomEvent("rivya:changed"));

  const say = (text) => {
    live.textContent = "";
    setTimeout(() => { live.textContent = text; }, 50);
  };

  // Micro-credits as credits, as rivya.money.credits_phrase words them: 1500 -> "0.0015 credits".
  const creditsPhrase = (micro) => {
    const value = Math.abs(Math.trunc(Number(micro) || 0));
    const whole = Math.floor(value / 1e6);
    const frac = value % 1e6;
    let amount = String(whole);
    if (frac) amount += "." + String(frac).padStart(6, "0").replace(/0+$/, "");
    if (micro < 0) amount = "-" + amount;
    return amount === "1" ? "1 credit" : amount + " credits";
  };

  // The id of the element showing a field's errors, as rivya.pages.forms.error_slot makes it.
  const slotId = (key) => "err-" + key.replace(/[^A-Za-z0-9_-]/g, "-");

  const messageUrl = (id) => form.dataset.messageUrl.replace(form.dataset.anyMessage, id);

  const fromTemplate = (id) => document.getElementById(id).content.firstElementChild.cloneNode(true);

  // --- errors and notices ------------------------------------------------------------------

  const clearErrors = () => {
    form.querySelectorAll(".errors").forEach((slot) => { slot.textContent = ""; });
    notice.textContent = "";
  };

  const showNotice = (kind, build) => {
    notice.textContent = "";
    const box = document.createElement("div");
    box.className = "msg " + kind;
    build(box);
    notice.appendChild(box);
  };

  const plainNotice = (kind, text) => showNotice(kind, (box) => { box.textContent = text; });

  // Field errors next to their fields; what belongs to no field goes to the notice.
  const showErrors = (fields, message) => {
    const elsewhere = [];
    let first = null;
    for (const [key, messages] of Object.entries(fields)) {
      const slot = document.getElementById(slotId(key));
      if (!slot || !form.contains(slot)) {
        elsewhere.push(...messages);
        continue;
      }
      slot.textContent = "";
      for (const text of messages) {
        const p = document.createElement("p");
        p.textContent = text;
        slot.appendChild(p);
      }
      const details = slot.closest("details");
      if (details) details.open = true;
      first = first || slot;
    }
    plainNotice("error", elsewhere.length ? elsewhere.join(" ") : message || "Please fix the highlighted fields.");
    const field = first && first.closest(".field");
    const input = field && field.querySelector("input, select, textarea");
    if (input) input.focus();
  };

  // --- reading the form --------------------------------------------------------------------

  // The parameter inputs back into typed params: static/js/params-form.js.
  const readParams = () => window.rivyaReadParams(document, specs);

  const readBody = () => {
    const { params, errors } = readParams();
    const body = { content: content.value, params };
    if (!content.value.trim()) errors.content = ["Write a message."];
    const raw = maxTokens.value.trim();
    if (maxTokens.validity.badInput || (raw && !Number.isInteger(Number(raw)))) {
      errors.max_tokens = ["Enter a whole number."];
    } else if (raw) {
      body.max_tokens = Number(raw);
    }
    return { body, errors };
  };

  // --- the page while a reply streams ------------------------------------------------------

  const setStreaming = (on) => {
    send.disabled = on;
    stop.hidden = !on;
    form.classList.toggle("streaming", on);
    if (!on && (document.activeElement === stop || document.activeElement === document.body)) content.focus();
  };

  // Keep the newest words in view, unless the reader scrolled up to read something else.
  let following = true;
  const atBottom = () => window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
  window.addEventListener("scroll", () => { following = atBottom(); }, { passive: true });
  let scrollQueued = false;
  const follow = () => {
    if (!following || scrollQueued) return;
    scrollQueued = true;
    requestAnimationFrame(() => {
      scrollQueued = false;
      window.scrollTo(0, document.documentElement.scrollHeight);
      following = true;
    });
  };

  const setProgress = (turn, text) => {
    const note = turn.reply.querySelector("[data-progress]");
    if (note) note.textContent = text;
  };

  const setBadge = (turn, status, text) => {
    const badge = turn.reply.querySelector("[data-testid=message-status]");
    badge.className = "status " + status;
    badge.textContent = text;
  };

  // --- server-sent events ------------------------------------------------------------------

  const parseEvent = (block) => {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return { event, data: data.join("\n") };
  };

  const onEvent = (turn, { event, data }) => {
    let payload;
    try {
      payload = JSON.parse(data);
    } catch (error) {
      return;
    }
    if (event === "message") {
      turn.id = payload.id;
      turn.reply.id = "message-" + payload.id;
      turn.reply.dataset.id = payload.id;
      changed(); // its credits are held now: the header shows what is left available
    } else if (event === "delta") {
      turn.text.append(payload.text);
      turn.pieces += 1;
      setProgress(turn, "Writing… " + turn.pieces + " token" + (turn.pieces === 1 ? "" : "s") + " so far.");
      follow();
    } else if (event === "settlement") {
      turn.settled = payload;
    }
  };

  const readStream = async (turn, response) => {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = /\r?\n\r?\n/.exec(buffer)) !== null) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        onEvent(turn, parseEvent(block));
        if (turn.settled) {
          // The turn's last word: what follows (tool_result events) is for API clients; the
          // page shows a tool's task live from the settled message.
          reader.cancel().catch(() => {});
          return;
        }
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) onEvent(turn, parseEvent(buffer));
  };

  // --- the settled message, as the server renders it ---------------------------------------

  const swapIn = (turn, html) => {
    const holder = document.createElement("template");
    holder.innerHTML = html.trim();
    const node = holder.content.firstElementChild;
    if (!node) return;
    const hadFocus = turn.reply.contains(document.activeElement);
    turn.reply.replaceWith(node);
    turn.reply = node;
    if (window.htmx) window.htmx.process(node);
    // A chat without a title is named after its first message: show the name it got.
    const heading = document.getElementById("chat-heading");
    if (node.dataset.sessionTitle && heading && heading.dataset.untitled !== undefined) {
      heading.textContent = node.dataset.sessionTitle;
      delete heading.dataset.untitled;
      document.title = node.dataset.sessionTitle + " · Chat · Rivya";
    }
    if (hadFocus) content.focus();
    follow();
    changed();
    const charged = node.querySelector("[data-testid=credits-charged]");
    const cost = charged ? " " + charged.textContent.trim() + " credits charged." : "";
    say((node.dataset.status === "FAILED" ? "The reply failed." : "The reply is complete.") + cost);
  };

  // Ask for the message until it has settled (204 while it streams), then show it.
  const awaitSettled = async (turn) => {
    const url = messageUrl(turn.id) + "?seen=STREAMING";
    const deadline = Date.now() + POLL_FOR_MS;
    while (Date.now() < deadline) {
      let response = null;
      try {
        response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
      } catch (error) {
        response = null; // offline for a moment: ask again
      }
      if (response && response.status === 200) {
        swapIn(turn, await response.text());
        return;
      }
      if (response && response.status === 404) {
        setProgress(turn, "This chat was deleted meanwhile.");
        return;
      }
      await sleep(POLL_MS);
    }
    setProgress(turn, "The reply is taking long to settle; reload the page to see it.");
  };

  // --- a refusal before any reply ----------------------------------------------------------

  const refused = async (turn, response) => {
    turn.question.remove();
    turn.reply.remove();
    if (!content.value) content.value = turn.sent; // give the message back to edit or resend
    let error = null;
    try {
      error = (await response.json()).error || null;
    } catch (ignored) {
      error = null;
    }
    if (response.status === 402) {
      showNotice("error", (box) => {
        box.dataset.testid = "insufficient";
        const strong = document.createElement("strong");
        strong.textContent = "Not enough credits. ";
        const text = document.createElement("span");
        text.textContent = (error && error.message ? error.message + " " : "") + "You have ";
        const available = document.createElement("span");
        available.dataset.testid = "available";
        available.textContent = creditsPhrase(error && error.available_micro);
        const tail = document.createTextNode(" available; nothing was charged. ");
        const link = document.createElement("a");
        link.href = "/dashboard/";
        link.textContent = "How to get more credits";
        box.append(strong, text, available, tail, link);
      });
      changed();
    } else if (error && error.fields) {
      showErrors(error.fields, error.message);
    } else if (response.status === 404) {
      plainNotice("error", "This chat no longer exists (it was deleted, perhaps in another window).");
    } else if (response.status === 403) {
      plainNotice("error", "You were signed out, or the page is too old: reload it and try again.");
    } else if (error && error.message) {
      plainNotice(response.status >= 500 ? "error" : "warning", error.message);
    } else {
      plainNotice("error", "Something went wrong on our side (" + response.status + "). Please try again.");
    }
    say("The message was not sent.");
  };

  // --- one turn ----------------------------------------------------------------------------

  const sendTurn = async () => {
    clearErrors();
    const { body, errors } = readBody();
    if (Object.keys(errors).length) {
      showErrors(errors);
      return;
    }
    const question = fromTemplate("chat-user-template");
    question.querySelector(".text").textContent = body.content;
    const reply = fromTemplate("chat-reply-template");
    log.append(question, reply);
    content.value = "";
    following = true;
    follow();
    const turn = {
      question,
      reply,
      text: reply.querySelector(".text"),
      sent: body.content,
      id: null,
      pieces: 0,
      settled: null,
      stopped: false,
      controller: new AbortController(),
    };
    running = turn;
    setStreaming(true);
    say("Sent. The assistant is replying.");
    try {
      let response;
      try {
        response = await fetch(form.dataset.streamUrl, {
          method: "POST",
          credentials: "same-origin",
          headers: {
            Accept: "text/event-stream",
            "Content-Type": "application/json",
            "X-CSRFToken": csrfToken(),
          },
          body: JSON.stringify(body),
          signal: turn.controller.signal,
        });
      } catch (error) {
        if (turn.stopped) {
          // Stopped before the answer came: whether the turn was recorded is not known here.
          // The server's page is the truth; it shows the turn if there is one.
          setBadge(turn, "STOPPED", "Stopped");
          setProgress(turn, "Stopped. Reloading the conversation…");
          window.location.reload();
          return;
        }
        turn.question.remove();
        turn.reply.remove();
        if (!content.value) content.value = turn.sent;
        plainNotice("error", "Could not reach Rivya. Check your connection and try again.");
        return;
      }
      if (!response.ok) {
        await refused(turn, response);
        return;
      }
      try {
        await readStream(turn, response);
      } catch (error) {
        // Stop (the fetch aborted) or a broken connection: the reply goes on, on the server.
        turn.text.setAttribute("aria-busy", "false");
        if (turn.stopped) {
          setBadge(turn, "STOPPED", "Stopped");
          setProgress(turn, "Stopped on your screen. The reply runs to its end on the server and is charged for what it used; it shows here in full in a moment.");
          say("Stopped.");
        } else {
          setBadge(turn, "STREAMING", "Connection lost");
          setProgress(turn, "The connection broke. The reply goes on on the server; it shows here once it is done.");
        }
      }
      turn.text.setAttribute("aria-busy", "false");
      if (!turn.id) {
        setProgress(turn, "The reply's state is unknown; reload the page to see it.");
        return;
      }
      if (running === turn) {
        running = null;
        setStreaming(false);
      }
      if (!turn.stopped && turn.settled) setProgress(turn, "Done.");
      await awaitSettled(turn);
    } finally {
      if (running === turn) {
        running = null;
        setStreaming(false);
      }
    }
  };

  // --- wiring ------------------------------------------------------------------------------

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!running) sendTurn();
  });
  content.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey || event.altKey || event.isComposing) return;
    event.preventDefault();
    if (!running) form.requestSubmit();
  });
  stop.addEventListener("click", () => {
    if (!running) return;
    running.stopped = true;
    running.controller.abort();
  });
  send.disabled = false; // usable once this script runs (the page says chat needs JavaScript)
})();
