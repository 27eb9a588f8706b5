// The reader study's bone-scan viewer: both views side by side, window/level, zoom.
// Pixels come from /cases/<id>/pixels as little-endian uint16 (0..65535 for intensity 0..1),
// so window/level works on the full precision, not on an 8-bit picture.
(function () {
  "use strict";
  const viewer = document.getElementById("viewer");
  if (!viewer) { return; }
  const rows = Number(viewer.dataset.rows);
  const cols = Number(viewer.dataset.cols);
  const canvases = [document.getElementById("view-0"), document.getElementById("view-1")];
  const level = document.getElementById("level");
  const win = document.getElementById("window");
  const zoom = document.getElementById("zoom");
  const invert = document.getElementById("invert");
  const offscreen = canvases.map(function () {
    const c = document.createElement("canvas");
    c.width = cols;
    c.height = rows;
    return c;
  });
  let views = null;
  let auto = { level: 0.25, window: 0.5 };

  function percentile(values, q) {
    const sorted = Float32Array.from(values).sort();
    return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  }

  function fitZoom() {
    const room = Math.max(200, window.innerHeight - 220);
    return Math.max(1, Math.min(8, Math.floor((room / rows) * 4) / 4));
  }

  function reset() {
    level.value = auto.level;
    win.value = auto.window;
    zoom.value = fitZoom();
    draw();
  }

  function draw() {
    if (!views) { return; }
    const w = Math.max(Number(win.value), 1e-3);
    const low = Number(level.value) - w / 2;
    const scale = Number(zoom.value);
    for (let v = 0; v < 2; v++) {
      const ctx = offscreen[v].getContext("2d");
      const image = ctx.createImageData(cols, rows);
      const px = image.data;
      const values = views[v];
      for (let i = 0; i < values.length; i++) {
        let t = (values[i] / 65535 - low) / w;
        t = t < 0 ? 0 : (t > 1 ? 1 : t);
        const g = Math.round(255 * (invert.checked ? 1 - t : t));
        px[4 * i] = g; px[4 * i + 1] = g; px[4 * i + 2] = g; px[4 * i + 3] = 255;
      }
      ctx.putImageData(image, 0, 0);
      const canvas = canvases[v];
      canvas.width = Math.round(cols * scale);
      canvas.height = Math.round(rows * scale);
      const out = canvas.getContext("2d");
      out.imageSmoothingEnabled = false;
      out.drawImage(offscreen[v], 0, 0, canvas.width, canvas.height);
    }
  }

  [level, win, zoom, invert].forEach(function (el) { el.addEventListener("input", draw); });
  document.getElementById("reset").addEventListener("click", reset);

  canvases.forEach(function (canvas) {
    let drag = null;
    canvas.addEventListener("mousedown", function (e) {
      drag = { x: e.clientX, y: e.clientY, level: Number(level.value), window: Number(win.value) };
      e.preventDefault();
    });
    window.addEventListener("mouseup", function () { drag = null; });
    window.addEventListener("mousemove", function (e) {
      if (!drag) { return; }
      win.value = drag.window + (e.clientX - drag.x) / 400;
      level.value = drag.level - (e.clientY - drag.y) / 400;
      draw();
    });
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      zoom.value = Number(zoom.value) * (e.deltaY < 0 ? 1.25 : 0.8);
      draw();
    }, { passive: false });
  });

  fetch(viewer.dataset.pixels, { credentials: "same-origin", cache: "no-store" })
    .then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.arrayBuffer();
    })
    .then(function (buffer) {
      const all = new Uint16Array(buffer);
      views = [all.subarray(0, rows * cols), all.subarray(rows * cols, 2 * rows * cols)];
      const top = percentile(all, 0.995) / 65535;
      auto = { level: top / 2, window: Math.max(top, 0.01) };
      reset();
      viewer.dataset.loaded = "1";
    })
    .catch(function (error) {
      viewer.dataset.loaded = "error";
      viewer.insertAdjacentText("afterbegin", "The images could not be loaded (" + error.message + "). ");
    });
}());
