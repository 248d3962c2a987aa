/* The Studio's form for synchronous ("single") models (templates/pages/studio/_single_form.html):
   translation, completion, text to speech and transcription.

   The form posts straight to the API, POST /api/v1/single/<type>/ (session auth, Django's CSRF
   token): JSON, or multipart when files are chosen (params as a JSON string). The answer is the
   result, so when it returns the page shows it in place, rendered by the server as History
   renders it (/studio/tasks/<id>/result/), puts the run's card at the top of "Your runs"
   (/studio/tasks/<id>/, the card every run has) and refreshes the header's credits (the
   `rivya:changed` event, see rivya/pages/common.py). Refusals are shown with what to do: field
   errors next to their fields, 402, 422, 429 (with Retry-After), 502, 503, 504.

   The form is swapped in by htmx when another model is picked, so everything here is bound on
   the document, and the form's settings come from its `single-config` JSON. Prices are never
   computed here: the price bar asks the server (htmx, studio-price). No build step. */
(() => {
  "use strict";

  let busy = false;
  let retryTimer = null;

  const config = () => {
    const el = document.getElementById("single-config");
    return el ? JSON.parse(el.textContent) : null;
  };

  const csrfToken = (form) => {
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

  // The id of the element showing a field's errors, as rivya.pages.forms.error_slot makes it.
  const slotId = (key) => "err-" + key.replace(/[^A-Za-z0-9_-]/g, "-");

  const urlOf = (cfg, template, id) => template.replace(cfg.anyTask, id);

  const el = (tag, attrs, text) => {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  };

  const creditsWord = (amount) => (amount === "1" ? "1 credit" : amount + " credits");

  // --- errors and notices ------------------------------------------------------------------

  const noticeBox = () => document.getElementById("form-notice");

  const clearErrors = (form) => {
    form.querySelectorAll(".errors").forEach((slot) => { slot.textContent = ""; });
    const notice = noticeBox();
    if (notice) notice.textContent = "";
  };

  // A notice above the price bar: a class ("error", "warning", "success"), a title, sentences,
  // and optionally a link or a button.
  const showNotice = (kind, parts) => {
    const notice = noticeBox();
    if (!notice) return null;
    notice.textContent = "";
    const box = el("div", { class: "msg " + kind, "data-testid": "notice", "data-kind": kind });
    if (kind === "error") box.setAttribute("role", "alert");
    if (parts.title) box.appendChild(el("strong", {}, parts.title + " "));
    for (const text of parts.lines || []) if (text) box.appendChild(document.createTextNode(text + " "));
    if (parts.link) {
      const a = el("a", { href: parts.link.href }, parts.link.text);
      box.appendChild(a);
    }
    if (parts.button) {
      const row = el("div", { class: "row" });
      const button = el("button", { type: "button", "data-testid": parts.button.testid || "" }, parts.button.text);
      button.addEventListener("click", parts.button.onClick);
      row.appendChild(button);
      box.appendChild(row);
    }
    notice.appendChild(box);
    return box;
  };

  // Where an API field error goes: the text input, a body field that is a parameter, the files.
  const errorKey = (cfg, key) => {
    if (key === cfg.textField) return "prompt";
    if (cfg.bodyFields.includes(key)) return "params." + key;
    if (key === "files" || key.startsWith("files.")) return "files";
    return key;
  };

  const showErrors = (form, cfg, fields, message) => {
    const elsewhere = [];
    let first = null;
    for (const [key, messages] of Object.entries(fields || {})) {
      const slot = document.getElementById(slotId(errorKey(cfg, key)));
      if (!slot || !form.contains(slot)) {
        elsewhere.push(...messages);
        continue;
      }
      slot.textContent = "";
      for (const text of messages) slot.appendChild(el("p", {}, text));
      const details = slot.closest("details");
      if (details) details.open = true;
      first = first || slot;
    }
    showNotice("error", {
      title: "Nothing was sent to the provider and nothing was charged.",
      lines: [elsewhere.length ? elsewhere.join(" ") : message || "Please fix the highlighted fields."],
    });
    const field = first && first.closest(".field");
    const input = field && field.querySelector("input, select, textarea");
    if (input) input.focus();
  };

  // --- reading the form --------------------------------------------------------------------

  // The parameter inputs back into typed params: static/js/params-form.js.
  const readParams = (form, cfg) => window.rivyaReadParams(form, cfg.params);

  // The request: the type's text field, the body fields that are parameters (source_language,
  // max_tokens, voice, language) at the top level, the other parameters in `params`; multipart
  // when files are chosen.
  const readRequest = (form, cfg) => {
    const { params, errors } = readParams(form, cfg);
    const fields = { model: form.querySelector("[name=model]").value };
    const text = form.querySelector("#id_prompt");
    if (cfg.textField && text) fields[cfg.textField] = text.value;
    for (const name of cfg.bodyFields) {
      if (name in params) {
        fields[name] = params[name];
        delete params[name];
      }
    }
    const picker = form.querySelector("#id_files");
    const files = picker ? [...picker.files] : [];
    if (!files.length) {
      return { body: JSON.stringify({ ...fields, params }), json: true, errors };
    }
    const body = new FormData();
    for (const [name, value] of Object.entries(fields)) body.append(name, String(value));
    body.append("params", JSON.stringify(params));
    for (const file of files) body.append("files", file, file.name);
    return { body, json: false, errors };
  };

  // --- the page while a request runs -------------------------------------------------------

  const submitButton = (form) => form.querySelector(".submit");

  const setBusy = (form, on) => {
    busy = on;
    const button = submitButton(form);
    if (button) {
      if (on) button.dataset.label = button.dataset.label || button.textContent;
      button.disabled = on || (button.dataset.retryUntil && Date.now() < Number(button.dataset.retryUntil));
      button.textContent = on ? "Working…" : button.dataset.label || button.textContent;
    }
    form.classList.toggle("running", on);
    const result = document.getElementById("single-result");
    if (!result) return;
    result.setAttribute("aria-busy", on ? "true" : "false");
    if (on) {
      result.textContent = "";
      const working = el("p", { class: "single-working", "data-testid": "single-working" });
      working.appendChild(el("span", { class: "spinner", "aria-hidden": "true" }));
      working.appendChild(document.createTextNode(" Working on it: the answer appears here."));
      result.appendChild(working);
    } else {
      const working = result.querySelector(".single-working");
      if (working) working.remove();
    }
  };

  // 429: the submit waits out Retry-After, counting down.
  const holdOff = (form, seconds) => {
    const button = submitButton(form);
    if (!button) return;
    const label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    button.dataset.retryUntil = String(Date.now() + seconds * 1000);
    clearInterval(retryTimer);
    const tick = () => {
      const left = Math.ceil((Number(button.dataset.retryUntil) - Date.now()) / 1000);
      if (left <= 0 || !document.body.contains(button)) {
        clearInterval(retryTimer);
        delete button.dataset.retryUntil;
        button.disabled = false;
        button.textContent = label;
        return;
      }
      button.disabled = true;
      button.textContent = label + " (" + left + " s)";
    };
    tick();
    retryTimer = setInterval(tick, 1000);
  };

  // The run's card (the same partial every run has) at the top of "Your runs".
  const addCard = async (cfg, taskId) => {
    const runs = document.getElementById("studio-runs");
    if (!runs || !taskId) return;
    try {
      const response = await fetch(urlOf(cfg, cfg.cardUrl, taskId), { headers: { "HX-Request": "true" } });
      if (!response.ok) return;
      const holder = document.createElement("div");
      holder.innerHTML = (await response.text()).trim();
      const card = holder.firstElementChild;
      if (!card) return;
      const existing = document.getElementById(card.id);
      if (existing) existing.replaceWith(card);
      else runs.prepend(card);
      if (window.htmx) window.htmx.process(card);
    } catch (error) {
      // The card is a convenience: History has the run.
    }
  };

  const showResult = async (cfg, taskId) => {
    const result = document.getElementById("single-result");
    if (!result) return;
    let html = "";
    try {
      const response = await fetch(urlOf(cfg, cfg.resultUrl, taskId), { headers: { "HX-Request": "true" } });
      if (response.ok) html = await response.text();
    } catch (error) {
      html = "";
    }
    result.textContent = "";
    if (html) {
      result.innerHTML = html;
      if (window.htmx) window.htmx.process(result);
    } else {
      const p = el("p", { class: "msg" }, "Done. The answer could not be shown here: ");
      p.appendChild(el("a", { href: urlOf(cfg, cfg.historyUrl, taskId) }, "open it in History"));
      result.appendChild(p);
    }
  };

  const historyLink = (cfg, taskId) => (taskId ? { href: urlOf(cfg, cfg.historyUrl, taskId), text: "See it in History." } : null);

  const refundWords = (data) => {
    const credits = data.credits || {};
    if (credits.charged_micro) return creditsWord(credits.charged) + " charged.";
    if (credits.refunded_micro) return "Nothing was charged: the " + creditsWord(credits.refunded) + " set aside went back to your balance.";
    return "Nothing was charged.";
  };

  // --- the answer --------------------------------------------------------------------------

  const handle = async (form, cfg, response, data) => {
    const status = response.status;
    const error = data.error || {};
    const taskId = data.task_id || (status === 202 ? data.id : "");
    const cause = error.kind && cfg.faults[error.kind] ? "Cause: " + cfg.faults[error.kind] + "." : "";
    if (taskId) changed(); // credits were held and settled, or a refusal was notified
    switch (status) {
      case 200:
        await showResult(cfg, taskId);
        showNotice("success", { lines: ["Done. " + refundWords(data)] });
        break;
      case 202:
        showNotice("success", {
          title: "Running in the background.",
          lines: ["Follow it under Your runs; the result shows there and in History when it is ready."],
        });
        break;
      case 400:
        if (error.code === "requires_async") {
          showNotice("warning", {
            title: "Too long to run here.",
            lines: [error.message, "It can run in the background instead: the price is the same, and the result shows under Your runs."],
            button: { text: "Run it in the background", testid: "run-async", onClick: () => send(form, { respondAsync: true }) },
          });
        } else {
          showErrors(form, cfg, error.fields, error.message);
        }
        break;
      case 402:
        showNotice("error", {
          title: "Not enough credits.",
          lines: [error.message, "Nothing was charged."],
          link: { href: "/dashboard/", text: "Get more credits" },
        });
        break;
      case 409:
        showNotice("warning", { title: data.status === "CANCELLED" ? "Cancelled." : "Not run.", lines: [error.message], link: historyLink(cfg, taskId) });
        break;
      case 413:
        showNotice("error", { title: "That upload is too large.", lines: ["Choose a smaller file. Nothing was charged."] });
        break;
      case 422:
        if (taskId) {
          showNotice("error", {
            title: "The provider refused this input.",
            lines: [cause, error.message, refundWords(data), "Change the input and try again."],
            link: historyLink(cfg, taskId),
          });
        } else {
          showNotice("error", { title: "Not run.", lines: [error.message] });
        }
        break;
      case 429: {
        const wait = Math.max(1, parseInt(response.headers.get("Retry-After") || "5", 10) || 5);
        showNotice("warning", {
          title: "Rivya is busy right now.",
          lines: [error.message || "Every place for these requests is taken.", "Nothing was charged. The button works again in " + wait + " s."],
        });
        holdOff(form, wait);
        break;
      }
      case 502:
        showNotice("error", {
          title: "The provider failed.",
          lines: [cause, error.message, refundWords(data), "Try again in a moment; if it keeps failing, try another model."],
          link: historyLink(cfg, taskId),
        });
        break;
      case 503:
        showNotice("error", {
          title: error.code === "upload_failed" ? "The file could not be stored." : "A problem on our side.",
          lines: [error.message, taskId ? "" : "Nothing was charged.", "Try again in a minute."],
          link: historyLink(cfg, taskId),
        });
        break;
      case 504:
        showNotice("error", {
          title: "The provider did not answer in time.",
          lines: [error.message, refundWords(data), "Try again, or with a shorter input."],
          link: historyLink(cfg, taskId),
        });
        break;
      default:
        showNotice("error", {
          title: "Something went wrong (" + status + ").",
          lines: [error.message || "Please try again."],
          link: historyLink(cfg, taskId),
        });
    }
    if (taskId) await addCard(cfg, taskId);
  };

  const send = async (form, { respondAsync = false } = {}) => {
    const cfg = config();
    if (!cfg || busy) return;
    clearErrors(form);
    const { body, json, errors } = readRequest(form, cfg);
    if (Object.keys(errors).length) {
      showErrors(form, cfg, errors);
      return;
    }
    const headers = { "X-CSRFToken": csrfToken(form), Accept: "application/json" };
    if (json) headers["Content-Type"] = "application/json";
    if (respondAsync) headers.Prefer = "respond-async";
    setBusy(form, true);
    let response;
    let data = {};
    try {
      response = await fetch(cfg.apiUrl, { method: "POST", headers, body, credentials: "same-origin" });
      try {
        data = await response.json();
      } catch (error) {
        data = {};
      }
    } catch (error) {
      setBusy(form, false);
      showNotice("error", {
        title: "Could not reach Rivya.",
        lines: ["Check your connection and try again. If the request had started, it shows in History."],
        link: { href: "/history/", text: "Open History" },
      });
      return;
    }
    setBusy(form, false);
    try {
      await handle(form, cfg, response, data);
    } finally {
      const answer = document.querySelector("#single-result [data-testid=single-answer]");
      if (answer && response.status === 200) answer.focus({ preventScroll: false });
    }
  };

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || form.id !== "single-form") return;
    event.preventDefault();
    send(form);
  });

  // Picking another model swaps the form: nothing of the previous one is running any more.
  document.addEventListener("htmx:beforeSwap", (event) => {
    if (event.detail.target && event.detail.target.id === "studio-workspace") {
      clearInterval(retryTimer);
    }
  });
})();
