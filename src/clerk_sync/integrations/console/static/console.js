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

  // The skip link: focus into the page's content, on this very page (its href drops the query, so a filtered
  // list would be reloaded unfiltered).
  var skip = document.querySelector("a.skip");
  var target = document.getElementById("main");
  if (skip && target) {
    skip.addEventListener("click", function (event) {
      event.preventDefault();
      target.focus();
      target.scrollIntoView();
    });
  }

  // A table wider than the window scrolls in its own box (the page does not, down to 320 px): a keyboard can
  // scroll it only if it takes focus, so a box that overflows is a named, focusable region; one that fits is
  // no tab stop.
  function scrollers() {
    document.querySelectorAll(".table-scroll").forEach(function (box) {
      var caption = box.querySelector("caption");
      if (box.scrollWidth > box.clientWidth) {
        box.setAttribute("tabindex", "0");
        box.setAttribute("role", "region");
        box.setAttribute("aria-label", caption ? caption.textContent : "table");
      } else {
        ["tabindex", "role", "aria-label"].forEach(function (name) { box.removeAttribute(name); });
      }
    });
  }
  scrollers();
  window.addEventListener("resize", scrollers);

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
