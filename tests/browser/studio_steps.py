"""Steps the Studio browser tests share (not a test module): picking a model, setting the
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
    """Choose a category, then one of its models; the form is swapped in place."""
    page.locator(f"#cat-{category}").click()
    page.locator(f"#pick-{slug}").click()
    page.wait_for_selector(f"[data-testid=studio-form-card][data-model={slug}]")
