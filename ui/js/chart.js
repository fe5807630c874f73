// A small live line chart drawn in SVG: a few series over the last samples, autoscaled.

const NS = 'http://www.w3.org/2000/svg';
const W = 300;
const H = 90;
const PAD_L = 2;
const PAD_T = 4;
const PAD_B = 4;

function svg(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs ?? {})) el.setAttribute(k, v);
  return el;
}

/** A chart of series [{label, color}] keeping at most `keep` samples. */
export class LineChart {
  constructor({ title, series, format, keep = 60 }) {
    this.series = series;
    this.format = format ?? ((v) => v.toFixed(0));
    this.keep = keep;
    this.samples = [];
    this.svg = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', 'aria-hidden': 'true' });
    this.caption = document.createElement('div');
    this.caption.className = 'caption';
    this.el = document.createElement('figure');
    this.el.className = 'chart-box';
    this.el.style.margin = '0';
    this.el.setAttribute('role', 'img');
    this.el.append(this.caption, this.svg);
    this.title = title;
    this.draw();
  }

  /** Adds one sample: one number per series. */
  push(values) {
    this.samples.push(values.map((v) => (Number.isFinite(v) ? v : 0)));
    if (this.samples.length > this.keep) this.samples.shift();
    this.draw();
  }

  draw() {
    const el = this.svg;
    while (el.firstChild) el.removeChild(el.firstChild);
    const max = Math.max(1e-9, ...this.samples.flat());
    const x = (i) => PAD_L + ((W - PAD_L * 2) * i) / Math.max(1, this.keep - 1);
    const y = (v) => H - PAD_B - ((H - PAD_T - PAD_B) * v) / max;
    el.append(svg('line', { class: 'axis', x1: PAD_L, x2: W - PAD_L, y1: H - PAD_B, y2: H - PAD_B }));
    const last = this.samples[this.samples.length - 1];
    const labels = [];
    this.series.forEach((s, k) => {
      if (this.samples.length > 1) {
        const off = this.keep - this.samples.length;
        const pts = this.samples.map((vals, i) => `${x(i + off).toFixed(1)},${y(vals[k]).toFixed(1)}`).join(' ');
        el.append(svg('polyline', { class: 'line', points: pts, stroke: s.color, 'vector-effect': 'non-scaling-stroke' }));
      }
      labels.push(`${s.label} ${last ? this.format(last[k]) : '–'}`);
    });
    this.caption.textContent = `${this.title}: ${labels.join(' · ')}`;
    this.el.setAttribute('aria-label', `${this.caption.textContent} (max ${this.format(max === 1e-9 ? 0 : max)})`);
  }
}
