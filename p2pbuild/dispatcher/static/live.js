// p2pbuild web view: live updates, hand-written, no build step, nothing loaded from
// elsewhere. Pages work without it; with it they follow the dispatcher's public event
// stream (/v1/web/events, NDJSON) and, when something relevant happened, fetch the page
// again and swap its <main>. Live logs (<pre data-log-url>) are streamed into the page.
(function () {
  "use strict";
  var main = document.querySelector("main[data-live]");
  if (!main || !window.fetch || !window.TextDecoder) { return; }
  var pending = null;
  var logs = {};

  function relevant(event) {
    var build = main.getAttribute("data-build");
    return !build || event.build_id === build || event.event === "hello";
  }

  function streamLog(pre) {
    var url = pre.getAttribute("data-log-url");
    if (logs[url]) { return; }
    logs[url] = pre;
    var decoder = new TextDecoder();
    fetch(url).then(function (response) {
      var reader = response.body.getReader();
      function next() {
        return reader.read().then(function (part) {
          if (part.done) { pre.setAttribute("data-done", "1"); return; }
          var stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
          pre.appendChild(document.createTextNode(decoder.decode(part.value, {stream: true})));
          if (stick) { pre.scrollTop = pre.scrollHeight; }
          return next();
        });
      }
      return next();
    }).catch(function () { delete logs[url]; });
  }

  function startLogs() {
    var pres = main.querySelectorAll("pre[data-log-url]");
    for (var i = 0; i < pres.length; i++) { streamLog(pres[i]); }
  }

  function refresh() {
    pending = null;
    fetch(location.href, {headers: {"accept": "text/html"}}).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (text) {
      if (!text) { return; }
      var fresh = new DOMParser().parseFromString(text, "text/html").querySelector("main[data-live]");
      if (!fresh) { return; }
      // Keep the logs already streaming (their text so far stays).
      var pres = fresh.querySelectorAll("pre[data-log-url]");
      for (var i = 0; i < pres.length; i++) {
        var kept = logs[pres[i].getAttribute("data-log-url")];
        if (kept) { pres[i].parentNode.replaceChild(kept, pres[i]); }
      }
      main.parentNode.replaceChild(fresh, main);
      main = fresh;
      startLogs();
    }).catch(function () {});
  }

  // At most one reload a second however busy the farm is (a reload is one request).
  var last = 0;
  function soon() {
    if (pending === null) {
      var wait = Math.max(250, last + 1000 - Date.now());
      pending = setTimeout(function () { last = Date.now(); refresh(); }, wait);
    }
  }

  function follow(after) {
    var decoder = new TextDecoder();
    var buffer = "";
    fetch("/v1/web/events?after=" + after).then(function (response) {
      var reader = response.body.getReader();
      function next() {
        return reader.read().then(function (part) {
          if (part.done) { setTimeout(function () { follow(after); }, 200); return; }
          buffer += decoder.decode(part.value, {stream: true});
          var lines = buffer.split("\n");
          buffer = lines.pop();
          for (var i = 0; i < lines.length; i++) {
            if (!lines[i]) { continue; }
            var event = JSON.parse(lines[i]);
            if (event.event !== "hello") {
              after = Math.max(after, event.id);
              if (relevant(event)) { soon(); }
            }
          }
          return next();
        });
      }
      return next();
    }).catch(function () { setTimeout(function () { follow(after); }, 3000); });
  }

  startLogs();
  var after = parseInt(main.getAttribute("data-after") || "", 10);
  if (!isNaN(after)) {
    follow(after);
  } else {
    // Pages without events (nodes): refresh every few seconds while visible.
    setInterval(function () { if (!document.hidden) { refresh(); } }, 3000);
  }
}());
