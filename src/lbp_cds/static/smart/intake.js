/* Progressive enhancement of the intake form (the form works without it):
   - a question with data-enable-when is hidden, and its inputs disabled so they are not sent,
     while its enableWhen is not met: the same FHIR R4 semantics as intake.parse_answers
     ("=" some answer equals; "!=" none does; "exists"; no answer meets nothing but
     exists=false; enableBehavior any / all);
   - the error summary, when there is one, takes the focus so a screen reader reads it first. */
(function () {
  "use strict";
  var form = document.querySelector("form");
  if (!form) { return; }

  function answers(name) {
    var out = [];
    var fields = form.elements.namedItem(name);
    if (!fields) { return out; }
    var list = fields.length !== undefined && !fields.tagName ? fields : [fields];
    for (var i = 0; i < list.length; i++) {
      var f = list[i];
      if (f.disabled) { continue; }
      if ((f.type === "radio" || f.type === "checkbox") && !f.checked) { continue; }
      var v = (f.value || "").trim();
      if (v) { out.push(v); }
    }
    return out;
  }

  function compare(op, a, b) {
    var x = parseFloat(a), y = parseFloat(b);
    if (isNaN(x) || isNaN(y)) { x = a; y = b; }
    if (op === ">") { return x > y; }
    if (op === "<") { return x < y; }
    if (op === ">=") { return x >= y; }
    if (op === "<=") { return x <= y; }
    return false;
  }

  function meets(c) {
    var got = answers(c.question);
    if (c.operator === "exists") { return (got.length > 0) === (c.answer === "true"); }
    if (!got.length) { return false; }
    if (c.operator === "=") { return got.indexOf(c.answer) >= 0; }
    if (c.operator === "!=") { return got.indexOf(c.answer) < 0; }
    for (var i = 0; i < got.length; i++) {
      if (compare(c.operator, got[i], c.answer)) { return true; }
    }
    return false;
  }

  var questions = Array.prototype.slice.call(document.querySelectorAll("[data-enable-when]"));

  function update() {
    // Repeat until stable: a question may depend on one that was just hidden.
    for (var pass = 0; pass <= questions.length; pass++) {
      var changed = false;
      questions.forEach(function (q) {
        var rule;
        try { rule = JSON.parse(q.getAttribute("data-enable-when")); } catch (e) { return; }
        var met = rule.conditions.map(meets);
        var on = rule.behavior === "any" ? met.indexOf(true) >= 0 : met.indexOf(false) < 0;
        if (q.hidden === !on) { return; }
        q.hidden = !on;
        Array.prototype.forEach.call(q.querySelectorAll("input, select, textarea"), function (el) {
          el.disabled = !on;
        });
        changed = true;
      });
      if (!changed) { break; }
    }
  }

  form.addEventListener("change", update);
  form.addEventListener("input", update);
  update();

  var summary = document.getElementById("error-summary");
  if (summary) { summary.focus(); }
})();
