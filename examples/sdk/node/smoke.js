// The unmodified Azure IoT Node device SDK against a hub: every device feature over MQTT,
// MQTT over WebSockets and HTTPS, with the service side driven over the hub's REST API.
// Prints PASS/FAIL per check; exits 1 on any failure. It creates its own devices
// (node-smoke-<hex>-{mqtt,ws,http}) and deletes them at the end.
//
//   npm install
//   IOTHUB_CONNECTION_STRING='HostName=…;SharedAccessKeyName=iothubowner;SharedAccessKey=…' \
//   NODE_EXTRA_CA_CERTS=/path/to/ca.pem node smoke.js
//
// The SDK dials the standard ports (8883, 443), so the hub's host name must resolve to it
// (see the conformance README's /etc/hosts recipe).

const crypto = require('crypto');
const https = require('https');
const { Client, Message } = require('azure-iot-device');
const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');
const { Http } = require('azure-iot-device-http');
const { SharedAccessSignature, anHourFromNow } = require('azure-iot-common');

const TIMEOUT_MS = 15000;

const parse = (cs) =>
  Object.fromEntries(cs.split(';').filter(Boolean).map((kv) => {
    const i = kv.indexOf('=');
    return [kv.slice(0, i), kv.slice(i + 1)];
  }));

const service = parse(process.env.IOTHUB_CONNECTION_STRING || '');
if (!service.HostName || !service.SharedAccessKeyName || !service.SharedAccessKey) {
  console.error('set IOTHUB_CONNECTION_STRING to a service connection string (iothubowner)');
  process.exit(2);
}

const serviceToken = () =>
  SharedAccessSignature.create(service.HostName, service.SharedAccessKeyName, service.SharedAccessKey, anHourFromNow()).toString();

/** One service REST call; resolves with { status, body } whatever the status. */
function rest(method, path, body, headers = {}) {
  const payload = body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
  const query = `${path.includes('?') ? '&' : '?'}api-version=2021-04-12`;
  const options = {
    host: service.HostName,
    port: 443,
    method,
    path: path + query,
    headers: { Authorization: serviceToken(), 'Content-Type': 'application/json', ...headers },
  };
  return new Promise((resolve, reject) => {
    const req = https.request(options, (res) => {
      let text = '';
      res.on('data', (chunk) => (text += chunk));
      res.on('end', () => resolve({ status: res.statusCode, body: text }));
    });
    req.on('error', reject);
    if (payload !== undefined) req.write(payload);
    req.end();
  });
}

const within = (promise, what) =>
  Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`no ${what} within ${TIMEOUT_MS} ms`)), TIMEOUT_MS))]);
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

let failures = 0;
function check(name, ok, detail) {
  console.log(ok ? `PASS ${name}` : `FAIL ${name}: ${detail}`);
  if (!ok) failures++;
}

async function createDevice(id) {
  const res = await rest('PUT', `/devices/${encodeURIComponent(id)}`, { deviceId: id });
  if (res.status !== 200) throw new Error(`creating ${id}: ${res.status} ${res.body}`);
  const key = JSON.parse(res.body).authentication.symmetricKey.primaryKey;
  return `HostName=${service.HostName};DeviceId=${id};SharedAccessKey=${key}`;
}

/** Telemetry, twin (get, reported, desired), a direct method and C2D over an MQTT transport. */
async function mqttDevice(label, transport, id) {
  const client = Client.fromConnectionString(await createDevice(id), transport);
  await within(client.open(), 'open');
  check(`${label} open`, true);

  const event = new Message(JSON.stringify({ t: 21.5 }));
  event.messageId = 'm-1';
  event.correlationId = 'c-1';
  event.contentType = 'application/json';
  event.contentEncoding = 'utf-8';
  event.properties.add('Color', 'red');
  await within(client.sendEvent(event), 'PUBACK');
  check(`${label} telemetry acknowledged`, true);

  const twin = await within(client.getTwin(), 'twin');
  check(`${label} twin get`, twin.properties.reported.$version >= 1, JSON.stringify(twin.properties));
  await within(new Promise((resolve, reject) => twin.properties.reported.update({ fw: '1.0' }, (e) => (e ? reject(e) : resolve()))), 'reported 204');
  const seen = await rest('GET', `/twins/${id}`);
  check(`${label} reported seen by the service`, seen.status === 200 && JSON.parse(seen.body).properties.reported.fw === '1.0', seen.body);

  const desired = new Promise((resolve) => twin.on('properties.desired', (d) => d.speed === 7 && resolve(d)));
  await pause(1000); // the SDK subscribes to desired notifications in the background, with no callback
  const patch = await rest('PATCH', `/twins/${id}`, { properties: { desired: { speed: 7 } } }, { 'If-Match': '*' });
  check(`${label} service twin PATCH`, patch.status === 200, `${patch.status} ${patch.body}`);
  const notified = await within(desired, 'desired notification');
  check(`${label} desired notification`, typeof notified.$version === 'number', JSON.stringify(notified));

  client.onDeviceMethod('reboot', (request, response) => response.send(201, { echoed: request.payload }, () => {}));
  await pause(1000); // and to methods
  const call = await rest('POST', `/twins/${id}/methods`, { methodName: 'reboot', payload: { x: 1 }, responseTimeoutInSeconds: 10 });
  const answer = call.status === 200 ? JSON.parse(call.body) : {};
  check(`${label} direct method`, answer.status === 201 && answer.payload.echoed.x === 1, `${call.status} ${call.body}`);

  const received = new Promise((resolve) => client.on('message', (m) => client.complete(m, () => resolve(m))));
  await pause(1000); // and to C2D
  const send = await rest('POST', `/devices/${id}/messages/deviceBound`, 'hello', { 'iothub-messageid': 'c2d-1', 'iothub-correlationid': 'cc', 'iothub-ack': 'full' });
  check(`${label} C2D send`, send.status === 204, `${send.status} ${send.body}`);
  const message = await within(received, 'C2D message');
  check(`${label} C2D received`, message.data.toString() === 'hello' && message.messageId === 'c2d-1' && message.correlationId === 'cc',
    JSON.stringify({ body: message.data.toString(), messageId: message.messageId, correlationId: message.correlationId }));

  await client.close();
}

/** Telemetry (single and batch) and C2D receive, complete and reject over HTTPS. */
async function httpDevice(id) {
  const client = Client.fromConnectionString(await createDevice(id), Http);
  client.setOptions({ http: { receivePolicy: { interval: 1 } } });
  await within(client.open(), 'open');
  const event = new Message('over https');
  event.messageId = 'h-1';
  event.properties.add('k', 'v');
  await within(client.sendEvent(event), 'telemetry 204');
  check('https telemetry', true);
  await within(client.sendEventBatch([new Message('x'), new Message('y')]), 'batch 204');
  check('https telemetry batch', true);

  const completed = new Promise((resolve, reject) => {
    client.on('message', (m) => client.complete(m, (e) => (e ? reject(e) : resolve(m))));
    client.on('error', reject);
  });
  const send = await rest('POST', `/devices/${id}/messages/deviceBound`, 'hello', { 'iothub-messageid': 'hc-1', 'iothub-contenttype': 'text/plain' });
  check('https C2D send', send.status === 204, `${send.status} ${send.body}`);
  const message = await within(completed, 'C2D message');
  check('https C2D received and completed', message.data.toString() === 'hello' && message.messageId === 'hc-1',
    JSON.stringify({ body: message.data.toString(), messageId: message.messageId }));

  client.removeAllListeners('message');
  const rejected = new Promise((resolve, reject) => client.on('message', (m) => client.reject(m, (e) => (e ? reject(e) : resolve(m)))));
  await rest('POST', `/devices/${id}/messages/deviceBound`, 'refuse me', { 'iothub-messageid': 'hc-2' });
  check('https C2D rejected', (await within(rejected, 'C2D message')).messageId === 'hc-2', 'another message');

  await client.close();
}

(async () => {
  const prefix = `node-smoke-${crypto.randomBytes(4).toString('hex')}`;
  const runs = [
    [`${prefix}-mqtt`, (id) => mqttDevice('mqtt', Mqtt, id)],
    [`${prefix}-ws`, (id) => mqttDevice('mqtt-ws', MqttWs, id)],
    [`${prefix}-http`, httpDevice],
  ];
  for (const [id, run] of runs) {
    try {
      await run(id);
    } catch (e) {
      check(id, false, e.stack);
    }
    await rest('DELETE', `/devices/${id}`, undefined, { 'If-Match': '*' });
  }
  console.log(failures ? `${failures} failed` : 'all passed');
  process.exit(failures ? 1 : 0);
})();
