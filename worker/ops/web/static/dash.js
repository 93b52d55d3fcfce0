// update-worker dashboard: refresh the live part of the page every few seconds, without a
// reload. The server renders (and escapes) the part; this only swaps it in.
"use strict";
(function () {
  const live = document.getElementById("live");

  function busy() {
    // Never pull the list from under an operator who is choosing letters.
    if (live.querySelector("input[type=checkbox]:checked")) return true;
    const focused = document.activeElement;
    return focused !== null && focused !== document.body && live.contains(focused);
  }

  async function refresh() {
    if (!busy()) {
      try {
        const url = new URL(window.location.href);
        url.searchParams.set("partial", "1");
        const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
        if (response.ok) {
          live.innerHTML = await response.text();
          live.dataset.refreshed = String(Date.now());
        }
      } catch (error) {
        live.dataset.refreshError = String(error);
      }
    }
    window.setTimeout(refresh, Number(live.dataset.refreshMs) || 3000);
  }

  document.addEventListener("change", function (event) {
    // "select all" in the dead-letter list
    if (event.target.id === "all") {
      for (const box of live.querySelectorAll("input[name=ids]")) box.checked = event.target.checked;
    }
  });

  if (live !== null) window.setTimeout(refresh, Number(live.dataset.refreshMs) || 3000);
})();
