// clerk-sync console: the drift page polls its run's status (no framework; the CSP allows only 'self').
(function () {
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
