"""Steps the browser tests share (not a test module): picking a model, setting the
sandbox knobs, reading a media element's duration in the page."""

from __future__ import annotations

from typing import Any

# Resolves with the media element's duration once its metadata has loaded; rejects with the
# media error if the file cannot be played.
MEDIA_DURATION = """el => new Promise((resolve, reject) => {
  const done = () => resolve(el.duration);
  if (el.readyState >= 1) { done(); return; }
  el.addEventListener("loadedmetadata", done, {once: true});
  const failed = () => reject(new Error("media error " + el.error.code));
  el.addEventListener("error", failed, {once: true});
  if (el.networkState === HTMLMediaElement.NETWORK_EMPTY) el.load();
})"""


def set_knobs(page: Any, **knobs: str) -> None:
    """Open the collapsed Testing (sandbox) section and set its knobs."""
    details = page.locator("details.testing")
    if details.get_attribute("open") is None:
        details.locator("summary").click()
    for name, value in knobs.items():
        control = page.locator(f"#id_param_sandbox_{name}")
        if control.evaluate("el => el.tagName") == "SELECT":
            control.select_option(value)
        else:
            control.fill(value)


def pick(page: Any, category: str, slug: str) -> None:
    """Choose a category, then one of its models; the form is swapped in place.

    The category's answer already shows a model's form (often this one), so the form being
    there does not mean the model's own answer has landed: wait until no htmx request is in
    flight, or that answer may replace the form after the prompt was typed into it (the prompt
    is then empty, the browser refuses to submit, and no run starts: seen in CI)."""
    page.locator(f"#cat-{category}").click()
    page.locator(f"#pick-{slug}").click()
    page.wait_for_selector(f"[data-testid=studio-form-card][data-model={slug}]")
    page.wait_for_function("document.querySelector('#studio-workspace .htmx-request') === null")
    page.wait_for_selector(f"[data-testid=studio-form-card][data-model={slug}]")
