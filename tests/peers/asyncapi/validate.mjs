// Validates an AsyncAPI document with the AsyncAPI project's parser (errors and warnings fail),
// then each received message against the payload schema its channel gives.
// Usage: node validate.mjs [--messages MESSAGES.jsonl] DOC.json...  (each line of MESSAGES:
// ["topic", "payload text"]; every message must belong to a channel of one of the documents)
import { Parser } from '@asyncapi/parser';
import Ajv from 'ajv';
import addFormats from 'ajv-formats';
import fs from 'node:fs';

const args = process.argv.slice(2);
let messagesPath = null;
if (args[0] === '--messages') { messagesPath = args[1]; args.splice(0, 2); }
const ajv = new Ajv({ strict: false, allErrors: true });
addFormats(ajv);
const esc = s => s.replace(/[.*+?^$()|[\]\\{}]/g, '\\$&');
const channels = [];
for (const docPath of args) {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(docPath, 'utf8'));
  const serious = diagnostics.filter(d => d.severity <= 1); // 0 error, 1 warning
  for (const d of serious) console.log(`${docPath}: ${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
  if (!document || serious.length) process.exit(1);
  // Each channel's address as a pattern (a parameter is one topic level) and its validator.
  for (const ch of document.channels().all()) {
    const levels = ch.address().split('/').map(l => (/^\{[^}]+\}$/.test(l) ? '[^/]+' : esc(l)));
    // A message without a payload schema (Sparkplug B protobuf) is not checked here.
    const payload = ch.messages().all()[0].payload();
    const validate = payload ? ajv.compile(payload.json()) : null;
    channels.push({ id: ch.id(), re: new RegExp('^' + levels.join('/') + '$'), validate });
  }
  console.log(`${docPath}: valid AsyncAPI ${document.version()}, ${document.channels().all().length} channels`);
}
if (!messagesPath) process.exit(0);
let failed = 0, checked = 0;
const unmatched = new Set();
for (const line of fs.readFileSync(messagesPath, 'utf8').split('\n').filter(Boolean)) {
  const [topic, payload] = JSON.parse(line);
  if (payload === '') continue; // an empty retained message clears its topic
  const ch = channels.find(c => c.re.test(topic));
  if (!ch) { unmatched.add(topic); continue; }
  if (!ch.validate) continue;
  checked++;
  if (!ch.validate(JSON.parse(payload))) {
    failed++;
    if (failed <= 10) console.log(`${topic} (channel ${ch.id}): ${ajv.errorsText(ch.validate.errors)}: ${payload.slice(0, 300)}`);
  }
}
console.log(`${checked} messages checked against their channel's schema, ${failed} invalid`);
for (const t of unmatched) console.log(`no channel of the document for topic ${t}`);
process.exit(failed || unmatched.size ? 1 : 0);
