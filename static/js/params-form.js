// Reading a model's parameter inputs back into typed params, as rivya.pages.forms.params_from_form
// reads them: empty inputs are left out (the model's default applies), unchecked boxes are false.
// Ranges and the rest are the server's to check. Shared by the chat page and the Studio's single
// forms: window.rivyaReadParams(root, specs) → {params, errors}.
(function () {
  "use strict";

  window.rivyaReadParams = (root, specs) => {
    const params = {};
    const errors = {};
    for (const spec of specs) {
      const input = root.querySelector("#id_param_" + spec.name);
      if (!input) continue;
      const key = "params." + spec.name;
      if (spec.widget === "checkbox") {
        params[spec.name] = input.checked;
        continue;
      }
      if (input.validity && input.validity.badInput) {
        errors[key] = [spec.kind === "integer" ? "Enter a whole number." : "Enter a number."];
        continue;
      }
      const raw = input.value.trim();
      if (!raw) continue;
      if (spec.widget === "select") {
        const option = spec.options.find((o) => String(o) === raw);
        if (option === undefined) errors[key] = ["Choose one of the options."];
        else params[spec.name] = option;
      } else if (spec.kind === "integer" || spec.kind === "number") {
        const number = Number(raw);
        if (!Number.isFinite(number)) errors[key] = ["Enter a number."];
        else if (spec.kind === "integer" && !Number.isInteger(number)) errors[key] = ["Enter a whole number."];
        else params[spec.name] = number;
      } else if (spec.widget === "json") {
        try {
          params[spec.name] = JSON.parse(raw);
        } catch (error) {
          errors[key] = ["Enter valid JSON."];
        }
      } else {
        params[spec.name] = raw;
      }
    }
    return { params, errors };
  };
})();
