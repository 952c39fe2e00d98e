"""sample_page.py: the index.html of a samples folder, its index.json, and the page in a real headless browser."""

import json
import math
import shutil
import struct
import subprocess
import wave
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest

import sample_page
import sampling
from tokens import tokenization_settings

TUNE = [834] + [3, 140, 316, 3, 140, 319, 3, 140, 323] * 3  # nine notes


class Page(HTMLParser):
    """What a reader of index.html sees: the sample names in order, the files it links, the body's data-check."""

    def __init__(self, content):
        super().__init__()
        self.names, self.links, self.texts, self.check, self.heading = [], [], [], None, False
        self.feed(content)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.heading = tag == 'h2'
        if tag == 'body':
            self.check = attrs.get('data-check')
        for key in ('src', 'href'):
            if key in attrs:
                self.links.append((tag, unquote(attrs[key], errors='surrogateescape')))

    def handle_endtag(self, tag):
        self.heading = False

    def handle_data(self, data):
        self.texts.append(data)
        if self.heading:
            self.names.append(data)


def read_page(folder):
    return Page((folder / 'index.html').read_text(encoding='utf-8'))


def touch_sample(folder, name, image=True, audio=False, asked=None, log=print):
    """A sample's files as save_sample leaves them (content beside the point here), listed on the page."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{name}.mid').write_bytes(b'MThd')
    if image:
        (folder / f'{name}.png').write_bytes(b'\x89PNG')
    if audio:
        (folder / f'{name}.wav').write_bytes(b'RIFF')
    return sample_page.add_sample(folder / f'{name}.mid', 9, asked or {}, image=image and folder / f'{name}.png',
                                  audio=audio and folder / f'{name}.wav', log=log)


def test_samples_are_listed_newest_first_with_roll_player_midi_and_what_they_were_asked(tmp_path):
    touch_sample(tmp_path, 'sample_step_100', asked={'step': 100})
    touch_sample(tmp_path, 'sample_step_200', audio=True, asked={'step': 200})
    touch_sample(tmp_path, 'sample_0', asked={'seed': 3, 'temperature': 0.9, 'key': 'D major'})
    page = read_page(tmp_path)
    assert page.names == ['sample_0', 'sample_step_200', 'sample_step_100']
    step_200 = [('a', 'sample_step_200.mid'), ('audio', 'sample_step_200.wav'), ('img', 'sample_step_200.png')]
    assert page.links == [('a', 'sample_0.mid'), ('img', 'sample_0.png')] + step_200 + \
        [('a', 'sample_step_100.mid'), ('img', 'sample_step_100.png')]
    assert 'seed 3 · temperature 0.9 · key D major' in page.texts and 'step 200' in page.texts
    entries = json.loads((tmp_path / 'index.json').read_text())
    assert [e['name'] for e in entries] == ['sample_step_100', 'sample_step_200', 'sample_0']
    assert entries[2]['asked'] == {'seed': 3, 'temperature': 0.9, 'key': 'D major'}
    assert page.check == 'pending'  # the page's own script sets it on load, in a browser


def test_a_sample_written_again_under_its_name_replaces_its_entry_and_moves_to_the_top(tmp_path):
    touch_sample(tmp_path, 'a', asked={'step': 1})
    touch_sample(tmp_path, 'b', asked={'step': 2})
    touch_sample(tmp_path, 'a', asked={'step': 3})
    page = read_page(tmp_path)
    assert page.names == ['a', 'b'] and 'step 3' in page.texts and 'step 1' not in page.texts


def test_names_with_markup_and_url_characters_are_escaped_in_text_and_links(tmp_path):
    name = '<script>&"x\'#1?%20'
    touch_sample(tmp_path, name, audio=True, asked={'prompt': '</p><b>tune</b>.mid'})
    content = (tmp_path / 'index.html').read_text(encoding='utf-8')
    assert '<script>&' not in content and '<b>' not in content
    page = read_page(tmp_path)
    assert page.names == [name] and 'prompt </p><b>tune</b>.mid' in page.texts
    assert sorted(page.links) == [('a', f'{name}.mid'), ('audio', f'{name}.wav'), ('img', f'{name}.png')]


def test_a_file_name_that_is_not_utf8_links_its_own_bytes(tmp_path):
    name = b'caf\xe9'.decode('utf-8', 'surrogateescape')  # a Latin-1 name, as Linux allows
    touch_sample(tmp_path, name)
    content = (tmp_path / 'index.html').read_text(encoding='utf-8')
    assert 'href="caf%E9.mid"' in content and '<h2>caf\\xe9</h2>' in content


def test_samples_whose_midi_is_gone_are_dropped_and_gone_images_or_audio_unlinked(tmp_path):
    for name in ('old', 'kept', 'rolled'):
        touch_sample(tmp_path, name, audio=True)
    (tmp_path / 'old.mid').unlink()
    (tmp_path / 'kept.png').unlink()
    (tmp_path / 'kept.wav').unlink()
    touch_sample(tmp_path, 'new')
    page = read_page(tmp_path)
    assert page.names == ['new', 'rolled', 'kept']
    assert all((tmp_path / path).is_file() for _, path in page.links)
    assert ('a', 'kept.mid') in page.links and ('audio', 'rolled.wav') in page.links
    assert [e['name'] for e in json.loads((tmp_path / 'index.json').read_text())] == ['kept', 'rolled', 'new']


@pytest.mark.parametrize('damage', [b'[{"name": "a", "mi', b'\xff\xfe not text', b'{"name": "a"}',
                                    b'[{"name": "x", "midi": "../../etc/passwd", "notes": 1, "written": "", '
                                    b'"asked": {}}]', b'[' * 100_000 + b']' * 100_000])
def test_a_damaged_index_json_is_one_warning_and_the_page_starts_again(tmp_path, damage):
    touch_sample(tmp_path, 'earlier')
    (tmp_path / 'index.json').write_bytes(damage)
    lines = []
    touch_sample(tmp_path, 'next', log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f'warning: {tmp_path / "index.json"} is ') and \
        lines[0].endswith('index.html starts again from the next sample'), lines
    assert read_page(tmp_path).names == ['next']
    touch_sample(tmp_path, 'after', log=lines.append)
    assert len(lines) == 1 and read_page(tmp_path).names == ['after', 'next']


def test_a_page_that_cannot_be_written_is_one_warning_and_the_sample_stays(tmp_path):
    (tmp_path / 'index.html').mkdir()  # a folder where the page should go, as a full disk would fail it
    lines = []
    touch_sample(tmp_path, 'a', log=lines.append)
    assert lines == [f'warning: cannot update {tmp_path / "index.html"}: Is a directory; the sample files are '
                     f'written']
    assert (tmp_path / 'a.mid').exists() and not list(tmp_path.glob('*.tmp'))


def test_save_sample_lists_the_sample_only_when_told_what_it_was_asked(tmp_path):
    settings = tokenization_settings()
    sampling.save_sample(TUNE, tmp_path / 'unlisted', settings, log=lambda *a: None, audio=False)
    assert not (tmp_path / 'index.html').exists()
    sampling.save_sample(TUNE, tmp_path / 'listed', settings, log=lambda *a: None, audio=False, asked={'step': 5})
    page = read_page(tmp_path)
    assert page.names == ['listed'] and page.links == [('a', 'listed.mid'), ('img', 'listed.png')]
    assert '9 notes · written ' in ''.join(page.texts)


# -----------------------------------------------------------------------------
# the page in a real browser: Debian's chromium, headless, straight from the disk

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def write_wav(path, seconds=0.5, rate=8000):
    """A short tone, standing in for FluidSynth's rendering where FluidSynth is not installed."""
    with wave.open(str(path), 'wb') as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b''.join(struct.pack('<h', int(8000 * math.sin(i * 0.1))) for i in range(int(seconds * rate))))


def samples_with_audio(folder):
    """Three samples made by save_sample, the middle one with audio (FluidSynth's where installed)."""
    settings, quiet = tokenization_settings(), lambda *a: None
    sampling.save_sample(TUNE, folder / 'sample_step_100', settings, log=quiet, audio=False, asked={'step': 100})
    sampling.save_sample(TUNE, folder / 'sample_step_200', settings, log=quiet, audio=False)
    if sampling.render_audio(folder / 'sample_step_200.mid', folder / 'sample_step_200.wav') is None:
        write_wav(folder / 'sample_step_200.wav')
    sample_page.add_sample(folder / 'sample_step_200.mid', 9, {'step': 200}, image=folder / 'sample_step_200.png',
                           audio=folder / 'sample_step_200.wav', log=quiet)
    sampling.save_sample(TUNE, folder / 'a <b>&"name', settings, log=quiet, audio=False,
                         asked={'checkpoint': 'best.pt (step 200)', 'seed': 0, 'temperature': 1.0, 'length': 24})


def open_in_chromium(page, profile):
    """(the DOM after the page's scripts ran, chromium's log) of page opened from the disk, without a network."""
    proc = subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                           '--disable-background-networking', '--disable-component-update', '--disable-sync',
                           f'--user-data-dir={profile}', '--enable-logging=stderr', '--v=0',
                           '--virtual-time-budget=5000',  # lets the audio players read their files' headers
                           '--dump-dom', page.as_uri()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


@pytest.mark.skipif(CHROMIUM is None, reason='chromium is not installed (Debian: apt install chromium)')
def test_the_page_loads_in_chromium_without_errors_and_every_image_player_and_link_works(tmp_path):
    folder = tmp_path / 'samples'
    samples_with_audio(folder)
    dom, log = open_in_chromium(folder / 'index.html', tmp_path / 'profile')
    page = Page(dom)
    assert page.check == 'ok 3 images 1 audio', page.check
    assert [line for line in log.splitlines() if ':CONSOLE' in line] == []  # no script error, nothing refused
    assert page.names == ['a <b>&"name', 'sample_step_200', 'sample_step_100']
    assert sorted(tag for tag, _ in page.links) == ['a'] * 3 + ['audio'] + ['img'] * 3
    assert all((folder / path).is_file() for _, path in page.links), page.links


@pytest.mark.skipif(CHROMIUM is None, reason='chromium is not installed (Debian: apt install chromium)')
def test_a_piano_roll_gone_after_the_page_was_written_is_named_on_the_page_in_chromium(tmp_path):
    folder = tmp_path / 'samples'
    samples_with_audio(folder)
    (folder / 'sample_step_100.png').unlink()
    (folder / 'sample_step_200.wav').write_bytes(b'RIFF, cut short')
    page = Page(open_in_chromium(folder / 'index.html', tmp_path / 'profile')[0])
    assert page.check == 'broken 3 images 1 audio', page.check
    assert 'not found or unreadable: sample_step_100.png, sample_step_200.wav' in page.texts
