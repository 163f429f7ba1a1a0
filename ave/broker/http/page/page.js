// The status page: reads the JSON the HTTP process serves and redraws itself.
//
// No framework and no build step. Holders describe themselves (user, program,
// job), so everything from the server becomes text nodes (textContent), never
// markup; the server's Content-Security-Policy backs that up.
'use strict';

const REFRESH_MS = 5000;
const UTILISATION_MS = 60000;
const STALE_S = 15;
const DAY_S = 24 * 3600;
const STATES = ['available', 'held', 'reserved', 'releasing', 'offline'];
const PALETTE = ['#2a5d9f', '#8a4b00', '#1f7a3d', '#7b2f8f', '#a11d4b', '#176c74',
                 '#6b5b00', '#444c5c'];
const SVG = 'http://www.w3.org/2000/svg';
const MAX_TEXT = 80;

const page = { equipment: null, queue: null, utilisation: null, serverTime: null,
               unreachable: false };

// -- fetching ---------------------------------------------------------------------------

async function fetchJson(path) {
  const response = await fetch(path, { cache: 'no-store' });
  if (!response.ok) {
    throw new Error(`${path}: ${response.status}`);
  }
  const date = Date.parse(response.headers.get('Date') || '');
  return { data: await response.json(), serverTime: isNaN(date) ? Date.now() / 1000 : date / 1000 };
}

async function refresh() {
  try {
    const [equipment, queue] = await Promise.all([fetchJson('api/equipment'),
                                                  fetchJson('api/queue')]);
    page.equipment = equipment.data;
    page.queue = queue.data;
    page.serverTime = equipment.serverTime;
    page.unreachable = false;
  } catch (error) {
    page.unreachable = true;
  }
  render();
}

async function refreshUtilisation() {
  try {
    const utilisation = await fetchJson('api/utilisation');
    page.utilisation = utilisation.data;
    page.utilisationTime = utilisation.serverTime;
  } catch (error) {
    page.unreachable = true;
  }
  renderChart();
}

function every(ms, task) {
  const run = async () => {
    if (!document.hidden) {
      await task();
    }
    setTimeout(run, ms);
  };
  run();
}

// -- small helpers ----------------------------------------------------------------------

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) {
    node.textContent = clip(String(text));
  }
  if (className) {
    node.className = className;
  }
  return node;
}

function clip(text) {
  return text.length > MAX_TEXT ? text.slice(0, MAX_TEXT - 1) + '…' : text;
}

function replaceChildren(id, ...children) {
  document.getElementById(id).replaceChildren(...children);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '';
  }
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function profileText(profile) {
  if (Array.isArray(profile)) {
    return '(' + profile.map(profileText).join(' + ') + ')';
  }
  if (profile === null || typeof profile !== 'object') {
    return String(profile);
  }
  const pairs = Object.entries(profile).filter(([key]) => key !== 'type')
    .map(([key, value]) => `${key}=${typeof value === 'object' ? JSON.stringify(value) : value}`);
  return [profile.type || '?', ...pairs].join(',');
}

function holderCell(holder) {
  const cell = element('td');
  cell.dataset.label = 'Holder';
  if (!holder) {
    return cell;
  }
  const who = [holder.user, holder.host].filter(Boolean).join('@') || 'unknown';
  cell.append(element('span', who, 'holder-name'));
  const program = holder.program ? String(holder.program).split('/').pop() : '';
  const extra = [program, holder.pid ? `pid ${holder.pid}` : ''].filter(Boolean).join(', ');
  if (extra) {
    cell.append(element('span', extra, 'holder-extra'));
  }
  if (holder.job) {
    const job = String(holder.job);
    if (/^https?:\/\//i.test(job)) {
      const link = element('a', job.replace(/^https?:\/\//i, ''));
      link.href = job;
      link.rel = 'noopener noreferrer';
      link.className = 'holder-extra';
      cell.append(link);
    } else {
      cell.append(element('span', job, 'holder-extra'));
    }
  }
  return cell;
}

function labelled(tag, label, text, className) {
  const cell = element(tag, text, className);
  cell.dataset.label = label;
  return cell;
}

function table(className, headings, rows) {
  const head = element('thead');
  const headRow = element('tr');
  headings.forEach((heading) => headRow.append(element('th', heading)));
  head.append(headRow);
  const body = element('tbody');
  rows.forEach((row) => body.append(row));
  const node = element('table', null, className);
  node.append(head, body);
  return node;
}

// -- rendering --------------------------------------------------------------------------

function render() {
  const equipment = page.equipment;
  const problem = document.getElementById('problem');
  const age = equipment && equipment.time !== null ? page.serverTime - equipment.time : null;
  let trouble = '';
  if (page.unreachable) {
    trouble = 'Cannot reach the status server: showing the last figures received.';
  } else if (age !== null && age > STALE_S) {
    trouble = `No report from the broker for ${duration(age)}: these figures may be out of date.`;
  }
  problem.textContent = trouble;
  problem.hidden = !trouble;
  if (!equipment) {
    return;
  }
  const where = equipment.lab ? `lab ${equipment.lab}` : (equipment.host || '');
  document.getElementById('title').textContent = where ? `AVE: ${clip(where)}` : 'AVE lab status';
  document.title = where ? `AVE ${where}` : 'AVE lab status';
  document.getElementById('freshness').textContent = equipment.time === null
    ? 'Waiting for the broker\'s first report…'
    : `Reported by ${clip(equipment.host || '?')} ${duration(age)} ago; refreshes every ${REFRESH_MS / 1000} s.`;
  renderSummary(equipment.equipment, (page.queue && page.queue.queue) || []);
  // Durations count on to the status server's clock, not stop at the report's.
  renderQueue((page.queue && page.queue.queue) || [], age || 0);
  renderEquipment(equipment.equipment, page.serverTime ?? equipment.time);
  document.body.dataset.rendered = 'yes';  // for tools that read the page, not only eyes
}

function renderSummary(items, queue) {
  const counts = Object.fromEntries(STATES.map((state) => [state, 0]));
  items.forEach((item) => { counts[item.state] = (counts[item.state] || 0) + 1; });
  const chips = STATES.map((state) => {
    const chip = element('li');
    chip.append(element('span', counts[state], 'count'), element('span', state, `state state-${state}`));
    return chip;
  });
  const waiting = element('li');
  waiting.append(element('span', queue.length, 'count'), element('span', 'waiting'));
  replaceChildren('summary', ...chips, waiting);
}

function renderQueue(queue, age) {
  if (!queue.length) {
    replaceChildren('queue', element('p', 'Nobody is waiting.', 'empty'));
    return;
  }
  const rows = queue.map((entry) => {
    const row = element('tr');
    row.append(labelled('td', '#', entry.position),
               holderCell(entry.holder),
               labelled('td', 'Wants', (entry.profiles || []).map(profileText).join('; ')),
               labelled('td', 'Priority', entry.priority),
               labelled('td', 'Waited', duration(entry.waited_s + age)));
    return row;
  });
  replaceChildren('queue', table('waiting', ['#', 'Holder', 'Wants', 'Priority', 'Waited'], rows));
}

function identityOf(item) {
  const profile = item.profile || {};
  return item.identity || profile.serial || profile.uid || '?';
}

function detailsOf(item) {
  const skip = new Set(['type', 'host', 'serial', 'uid']);
  return Object.entries(item.profile || {}).filter(([key]) => !skip.has(key))
    .map(([key, value]) => `${key}: ${Array.isArray(value) ? value.join(', ') : value}`)
    .join(' · ');
}

function sinceCell(since, now) {
  if (since === null || since === undefined) {
    return labelled('td', 'Since', '');
  }
  const cell = labelled('td', 'Since', duration(now - since));
  cell.title = new Date(since * 1000).toLocaleString();
  return cell;
}

function renderEquipment(items, now) {
  if (!items.length) {
    replaceChildren('equipment', element('p', 'No equipment reported.', 'empty'));
    return;
  }
  const byHost = new Map();
  items.forEach((item) => {
    const host = item.host || '';
    if (!byHost.has(host)) byHost.set(host, new Map());
    const byType = byHost.get(host);
    if (!byType.has(item.type)) byType.set(item.type, []);
    byType.get(item.type).push(item);
  });
  const sections = [];
  [...byHost.keys()].sort().forEach((host) => {
    if (byHost.size > 1 || host) sections.push(element('h3', host || 'this host'));
    const byType = byHost.get(host);
    [...byType.keys()].sort().forEach((type) => {
      const list = byType.get(type).sort((a, b) => identityOf(a).localeCompare(identityOf(b)));
      sections.push(element('h4', `${type} (${list.length})`));
      sections.push(table('items', ['Item', 'State', 'Holder', 'Since'], list.map((item) => {
        const row = element('tr');
        const identity = labelled('td', 'Item', identityOf(item), 'identity');
        const details = detailsOf(item);
        if (details) identity.append(element('span', details, 'details'));
        const state = labelled('td', 'State');
        state.append(element('span', item.state, `state state-${item.state}`));
        row.append(identity, state, holderCell(item.holder), sinceCell(item.since, now));
        return row;
      })));
    });
  });
  replaceChildren('equipment', ...sections);
}

// -- the utilisation chart --------------------------------------------------------------

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  Object.entries(attributes || {}).forEach(([key, value]) => node.setAttribute(key, value));
  return node;
}

function seriesOf(history) {
  const series = new Map([['all', []]]);
  history.buckets.forEach((bucket) => {
    if (bucket.all !== null) series.get('all').push([bucket.start, bucket.all]);
    Object.entries(bucket.types || {}).forEach(([type, value]) => {
      if (!series.has(type)) series.set(type, []);
      series.get(type).push([bucket.start, value]);
    });
  });
  return series;
}

function pathOf(points, bucketSeconds, x, y) {
  let path = '';
  let previous = null;
  points.forEach(([start, value]) => {
    const middle = start + bucketSeconds / 2;
    const joined = previous !== null && start - previous <= bucketSeconds;
    path += `${joined ? 'L' : 'M'}${x(middle).toFixed(1)} ${y(value).toFixed(1)}`;
    if (!joined) path += 'l0.01 0';  // a lone bucket still shows as a dot
    previous = start;
  });
  return path;
}

function renderChart() {
  const history = page.utilisation;
  const box = document.getElementById('chart');
  if (!history) {
    return;
  }
  const width = Math.max(280, Math.floor(box.clientWidth - 8));
  const height = width < 500 ? 160 : 200;
  const margin = { left: 38, right: 10, top: 10, bottom: 22 };
  const end = page.utilisationTime;
  const begin = end - DAY_S;
  const x = (t) => margin.left + (t - begin) / DAY_S * (width - margin.left - margin.right);
  const y = (f) => margin.top + (1 - f) * (height - margin.top - margin.bottom);
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img',
                             'aria-label': 'Share of equipment in use over the last 24 hours' });
  [0, 0.25, 0.5, 0.75, 1].forEach((f) => {
    chart.append(svg('line', { x1: margin.left, x2: width - margin.right, y1: y(f), y2: y(f), class: 'grid' }));
    const label = svg('text', { x: margin.left - 4, y: y(f) + 4, 'text-anchor': 'end' });
    label.textContent = `${f * 100}%`;
    chart.append(label);
  });
  const step = (width < 500 ? 6 : 3) * 3600;
  for (let t = Math.ceil(begin / step) * step; t <= end; t += step) {
    const label = svg('text', { x: x(t), y: height - 6, 'text-anchor': 'middle' });
    label.textContent = new Date(t * 1000).toTimeString().slice(0, 5);
    chart.append(label);
  }
  const legend = [];
  let colour = 0;
  seriesOf(history).forEach((points, name) => {
    if (!points.length) return;
    const stroke = name === 'all' ? '#1d2330' : PALETTE[colour++ % PALETTE.length];
    chart.append(svg('path', { d: pathOf(points, history.bucket_s, x, y), fill: 'none', stroke,
                               'stroke-width': name === 'all' ? 2.5 : 1.5,
                               'stroke-linejoin': 'round', 'stroke-linecap': 'round' }));
    const mean = points.reduce((sum, [, v]) => sum + v, 0) / points.length;
    const item = element('li');
    const swatch = element('span', null, 'swatch');
    swatch.style.background = stroke;
    item.append(swatch, element('span', `${name === 'all' ? 'all equipment' : name}: ` +
                                `${Math.round(mean * 100)}% on average`));
    legend.push(item);
  });
  if (!history.buckets.length) {
    const note = svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' });
    note.textContent = 'No utilisation recorded yet';
    chart.append(note);
  }
  box.replaceChildren(chart);
  replaceChildren('legend', ...legend);
  document.body.dataset.chart = 'yes';
}

// -- start ------------------------------------------------------------------------------

every(REFRESH_MS, refresh);
every(UTILISATION_MS, refreshUtilisation);
window.addEventListener('resize', renderChart);
document.addEventListener('visibilitychange', () => { if (!document.hidden) refresh(); });
