"""index.html of a samples folder: every sample with its piano roll, audio player, MIDI link and what it was asked,
newest first.

The page is rebuilt from index.json, a list of entries in the same folder, each time a sample is written; both are
written atomically, so a run stopped at any moment leaves the old page or the new one. Samples of earlier runs in
the folder stay listed; entries whose MIDI file is gone are dropped. The page works opened straight from the disk:
relative links only, nothing fetched from elsewhere.
"""

import html
import json
import time
from pathlib import Path
from urllib.parse import quote

from token_cache import write_atomically

INDEX_JSON = 'index.json'
INDEX_HTML = 'index.html'

STYLE = """body { font-family: sans-serif; max-width: 64em; margin: 1em auto; padding: 0 1em; color: #222; }
section { border-top: 1px solid #ccc; padding: 0.5em 0 1em; }
h2 { font-size: 1.1em; margin: 0.3em 0; overflow-wrap: anywhere; }
p { margin: 0.3em 0; }
.asked { color: #555; }
.missing { color: #b00; }
img { display: block; max-width: 100%; height: auto; }
audio { display: block; width: 100%; margin: 0.4em 0; }"""

# runs on load: marks the page (body's data-check) with what loaded, and names any image or audio file that did not,
# so a reader sees a broken sample and a headless browser can read the verdict from the DOM
CHECK_SCRIPT = """window.addEventListener('load', function () {
  var players = Array.from(document.querySelectorAll('audio'));
  Promise.all(players.map(function (audio) {
    return new Promise(function (done) {
      if (audio.readyState > 0 || audio.error) { done(); return; }
      audio.addEventListener('loadedmetadata', done);
      audio.addEventListener('error', done);
    });
  })).then(function () {
    var images = Array.from(document.querySelectorAll('img'));
    var broken = images.filter(function (img) { return !(img.naturalWidth > 0); })
      .concat(players.filter(function (audio) { return audio.error || !(audio.duration > 0); }))
      .map(function (element) { return element.getAttribute('src'); });
    if (broken.length) {
      var notice = document.getElementById('missing');
      notice.textContent = 'not found or unreadable: ' + broken.join(', ');
      notice.hidden = false;
    }
    document.body.dataset.check = (broken.length ? 'broken ' : 'ok ') + images.length + ' images ' +
      players.length + ' audio';
  });
});"""


def text(value):
    """HTML-escaped text of any value; bytes of a file name that are not UTF-8 are shown as \\xe9."""
    value = str(value).encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    return html.escape(value, quote=True)


def link(name):
    """A relative URL of a file in the folder, escaped for an attribute: '#', '?', '%' and the like are names here."""
    return html.escape(quote(name, safe='', errors='surrogateescape'), quote=True)


def valid_entry(entry):
    plain_name = lambda name: isinstance(name, str) and name and '/' not in name and '\\' not in name
    return (isinstance(entry, dict) and plain_name(entry.get('name')) and plain_name(entry.get('midi'))
            and all(entry.get(key) is None or plain_name(entry.get(key)) for key in ('image', 'audio'))
            and isinstance(entry.get('notes'), int) and isinstance(entry.get('written'), str)
            and isinstance(entry.get('asked'), dict))


def read_entries(folder, log=print):
    """The entries of folder/index.json, oldest first; a missing file is none, a damaged one is none with a
    one-line warning (the page then starts again from the sample being written)."""
    path = Path(folder) / INDEX_JSON
    try:
        entries = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested far too deep
        log(f'warning: {path} is unreadable ({e.strerror if isinstance(e, OSError) else "not JSON"}); '
            f'{INDEX_HTML} starts again from the next sample')
        return []
    if not isinstance(entries, list) or not all(valid_entry(entry) for entry in entries):
        log(f'warning: {path} is not a list of samples; {INDEX_HTML} starts again from the next sample')
        return []
    return entries


def present(entries, folder):
    """The entries whose MIDI file is still there, without links to an image or audio file that is gone."""
    kept = []
    for entry in entries:
        if not (folder / entry['midi']).is_file():
            continue
        kept.append({**entry, **{key: None for key in ('image', 'audio')
                                 if entry.get(key) and not (folder / entry[key]).is_file()}})
    return kept


def render_asked(asked):
    return ' · '.join(f'{text(key)} {text(value)}' for key, value in asked.items())


def render_entry(entry):
    name = entry['name']
    parts = [f'<section>\n<h2>{text(name)}</h2>']
    if entry['asked']:
        parts.append(f'<p class="asked">{render_asked(entry["asked"])}</p>')
    parts.append(f'<p>{entry["notes"]} notes · written {text(entry["written"])} · '
                 f'<a href="{link(entry["midi"])}">{text(entry["midi"])}</a></p>')
    if entry.get('audio'):
        parts.append(f'<audio controls preload="metadata" src="{link(entry["audio"])}"></audio>')
    if entry.get('image'):
        parts.append(f'<img src="{link(entry["image"])}" alt="piano roll of {text(name)}">')
    elif not entry['notes']:
        parts.append('<p class="missing">no notes: nothing to plot or play</p>')
    parts.append('</section>')
    return '\n'.join(parts)


def render_page(entries, folder):
    title = f'Samples in {text(Path(folder).resolve().name or folder)}'
    count = f'{len(entries)} sample{"" if len(entries) == 1 else "s"}'
    return '\n'.join([
        '<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f'<title>{title}</title>',
        f'<style>\n{STYLE}\n</style>', '</head>', '<body data-check="pending">', f'<h1>{title}</h1>',
        f'<p>{count}, newest first. Reload to see samples written since this page was opened.</p>',
        '<p id="missing" class="missing" hidden></p>',
        *(render_entry(entry) for entry in reversed(entries)),
        f'<script>\n{CHECK_SCRIPT}\n</script>', '</body>', '</html>', ''])


def write_text(path, content):
    write_atomically(path, lambda tmp: Path(tmp).write_text(content, encoding='utf-8'))


def add_sample(midi, notes, asked, image=None, audio=None, log=print):
    """List the sample whose MIDI file is midi (with its piano-roll PNG and WAV where written) on its folder's
    index.html, first; a sample of the same name is replaced. asked: what the sample was asked, a dict shown as
    'key value' pairs in its order. A page that cannot be written is a one-line warning: the sample is on disk."""
    midi = Path(midi)
    folder = midi.parent
    entry = {'name': midi.stem, 'midi': midi.name, 'image': Path(image).name if image else None,
             'audio': Path(audio).name if audio else None, 'notes': int(notes),
             'written': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), 'asked': dict(asked)}
    entries = [e for e in read_entries(folder, log) if e['name'] != entry['name']] + [entry]
    entries = present(entries, folder)
    try:
        write_text(folder / INDEX_JSON, json.dumps(entries, indent=1, default=str) + '\n')
        write_text(folder / INDEX_HTML, render_page(entries, folder))
    except OSError as e:
        log(f'warning: cannot update {folder / INDEX_HTML}: {e.strerror or e}; the sample files are written')
    return folder / INDEX_HTML
