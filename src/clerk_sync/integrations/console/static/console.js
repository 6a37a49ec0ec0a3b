// clerk-sync console (no framework; the CSP allows only 'self').
(function () {
  // A form posts once: a double click must not send an action (a replay) twice.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if ((form.getAttribute("method") || "").toLowerCase() !== "post") return;
    if (form.getAttribute("data-submitted")) { event.preventDefault(); return; }
    form.setAttribute("data-submitted", "1");
    form.querySelectorAll("button").forEach(function (button) { button.disabled = true; });
  });
  // Back to a page kept in the browser's cache: its forms can be sent again.
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted) return;
    document.querySelectorAll("form[data-submitted]").forEach(function (form) {
      form.removeAttribute("data-submitted");
      form.querySelectorAll("button").forEach(function (button) { button.disabled = false; });
    });
  });

  // The drift page polls its run's status.
  var box = document.querySelector("[data-poll]");
  if (!box) return;
  var url = box.getAttribute("data-poll");
  function tick() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.json(); })
      .then(function (state) {
        var phases = state.phases || {};
        var parts = Object.keys(phases).map(function (name) {
          var p = phases[name];
          return name + " " + p.done + (p.total ? "/" + p.total : "");
        });
        box.textContent = state.status + (parts.length ? ": " + parts.join(", ") : "");
        if (state.status === "running") { setTimeout(tick, 500); } else { window.location.reload(); }
      })
      .catch(function () { setTimeout(tick, 2000); });
  }
  setTimeout(tick, 300);
})();
