// A small line chart on a canvas: no library, no network.
// drawLineChart(canvas, points, options): points = [{t: unix seconds, v: number | null}];
// null values leave a gap. options: {color, yMin, yMax, format(v) -> label}.
"use strict";

function drawLineChart(canvas, points, options) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const pad = { left: 52, right: 10, top: 10, bottom: 22 };
  const format = options.format || ((v) => String(Math.round(v)));
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  const values = points.map((p) => p.v).filter((v) => v !== null);
  let yMin = options.yMin !== undefined ? options.yMin : Math.min(0, ...values);
  let yMax = options.yMax !== undefined ? options.yMax : Math.max(1, ...values);
  if (yMax <= yMin) yMax = yMin + 1;
  const t0 = points.length ? points[0].t : 0;
  const t1 = points.length ? points[points.length - 1].t : 1;
  const span = Math.max(t1 - t0, 1);
  const x = (t) => pad.left + ((t - t0) / span) * (w - pad.left - pad.right);
  const y = (v) => h - pad.bottom - ((v - yMin) / (yMax - yMin)) * (h - pad.top - pad.bottom);

  // Grid and y labels.
  ctx.strokeStyle = "#e3e6ea";
  ctx.fillStyle = "#6b7480";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = yMin + ((yMax - yMin) * i) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.left, y(v));
    ctx.lineTo(w - pad.right, y(v));
    ctx.stroke();
    ctx.fillText(format(v), 4, y(v) + 4);
  }
  ctx.fillText(points.length ? `last ${Math.round(span)} s` : "no data yet", pad.left, h - 6);

  // The series, broken at nulls.
  ctx.strokeStyle = options.color || "#2a9d5b";
  ctx.lineWidth = 2;
  ctx.beginPath();
  let open = false;
  for (const p of points) {
    if (p.v === null) { open = false; continue; }
    if (open) ctx.lineTo(x(p.t), y(p.v)); else ctx.moveTo(x(p.t), y(p.v));
    open = true;
  }
  ctx.stroke();
  for (const p of points) {
    if (p.v === null) continue;
    ctx.fillStyle = options.color || "#2a9d5b";
    ctx.fillRect(x(p.t) - 1.5, y(p.v) - 1.5, 3, 3);
  }
}
