//! SIP for the end-to-end calls: kamailio as registrar and proxy, baresip as the user agents.

use super::netns::Topology;
use std::process::{Child, Stdio};
use std::time::Duration;

/// Where the SIP server listens (in namespace `s`, beside the STUN server).
pub const SIP_SERVER: &str = "203.0.113.130";

/// Kamailio as the SIP registrar and proxy in namespace `s` (beside the STUN server). It records
/// where each REGISTER came from (with veil: the relay) and routes calls there; it keeps itself
/// on the signalling path (Record-Route) so in-dialog requests find the masked users too.
pub struct SipServer {
    child: Child,
    _dir: tempfile::TempDir,
}

/// Kamailio's configuration: registrar, Record-Route, NAT helpers for the masked users.
const KAMAILIO_CFG: &str = include_str!("kamailio.cfg");

impl SipServer {
    /// Starts kamailio in namespace `s` of `t`, listening on 203.0.113.130:5060.
    pub fn start(t: &Topology) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("kamailio.cfg");
        std::fs::write(&cfg, KAMAILIO_CFG).expect("cfg");
        let child = t
            .command("s", "kamailio")
            .args(["-DD", "-E", "-m", "32", "-M", "8", "-f"])
            .arg(&cfg)
            .arg("-Y")
            .arg(dir.path())
            .arg("-P")
            .arg(dir.path().join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kamailio (tests/run.sh installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while t
            .command("s", "ss")
            .args(["-Hlun", "sport", "= :5060"])
            .output()
            .expect("ss")
            .stdout
            .is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "kamailio did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, _dir: dir }
    }
}

impl Drop for SipServer {
    fn drop(&mut self) {
        // SIGTERM: the main process stops its children.
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A baresip user agent run as the managed user in `role`'s namespace: registers as `user`,
/// sends a sine tone of `tone` Hz, records what it hears (sndfile), answers calls, or dials
/// `dial`; quits after `seconds`.
pub struct Baresip {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(f64, String)>>>,
    dir: tempfile::TempDir,
}

impl Baresip {
    /// Starts the agent in network namespace `netns`; `stun` is the STUN server it asks for
    /// its server-reflexive address.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        netns: &str,
        user: &str,
        tone: u32,
        dial: Option<&str>,
        seconds: u32,
        stun: &str,
    ) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().expect("tempdir");
        let dumps = dir.path().join("dumps");
        std::fs::create_dir(&dumps).expect("dumps");
        std::fs::write(
            dir.path().join("config"),
            format!(
                "poll_method epoll\nsip_listen 0.0.0.0:5070\naudio_player alsa,null\naudio_alert alsa,null\n\
                 audio_source ausine,{tone}\nausrc_srate 48000\nausrc_channels 2\nrtp_ports 10000-10100\nmodule_path /usr/lib/baresip/modules\n\
                 module opus.so\nmodule ausine.so\nmodule alsa.so\nmodule sndfile.so\nmodule stun.so\n\
                 module_app account.so\nmodule_app menu.so\nsnd_path {}\n",
                dumps.display()
            ),
        )
        .expect("config");
        std::fs::write(
            dir.path().join("accounts"),
            format!(
                "<sip:{user}@{SIP_SERVER}>;regint=60;medianat=stun;stunserver=stun:{stun}:3478;answermode=auto;audio_codecs=opus\n"
            ),
        )
        .expect("accounts");
        for p in [dir.path(), dumps.as_path()] {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .expect("chmod");
        }
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", netns, "setpriv"])
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg("baresip")
            .arg("-f")
            .arg(dir.path())
            .args(["-t", &seconds.to_string()]);
        if let Some(uri) = dial {
            cmd.args(["-e", &format!("/dial {uri}")]);
        }
        let mut child = cmd
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("baresip (tests/run.sh installs baresip-core)");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(mut l) = sink.lock() {
                    l.push((super::unix_now(), line));
                }
            }
        });
        Self { child, lines, dir }
    }

    /// When a line containing `text` was printed, waiting up to `timeout`.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> Option<f64> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(at) = self
                .lines
                .lock()
                .ok()
                .and_then(|l| l.iter().find(|(_, s)| s.contains(text)).map(|(t, _)| *t))
            {
                return Some(at);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn output(&self) -> String {
        self.lines
            .lock()
            .map(|l| {
                l.iter()
                    .map(|(_, s)| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// Waits for the agent to quit; then the seconds and RMS of the audio it decoded (heard).
    pub fn finish(mut self) -> (f64, f64, String) {
        let _ = self.child.wait();
        let output = self.output();
        let heard = std::fs::read_dir(self.dir.path().join("dumps"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
            .and_then(|p| std::fs::read(p).ok())
            .map(|wav| wav_seconds_and_rms(&wav))
            .unwrap_or((0.0, 0.0));
        (heard.0, heard.1, output)
    }
}

/// Seconds and RMS of a 16-bit PCM WAV file's `data` chunk.
pub fn wav_seconds_and_rms(wav: &[u8]) -> (f64, f64) {
    let channels = wav
        .get(22..24)
        .and_then(|b| b.try_into().ok())
        .map_or(1, u16::from_le_bytes)
        .max(1);
    let rate = wav
        .get(24..28)
        .and_then(|b| b.try_into().ok())
        .map_or(8000, u32::from_le_bytes)
        * u32::from(channels);
    let Some(at) = wav.windows(4).position(|w| w == b"data") else {
        return (0.0, 0.0);
    };
    let samples: Vec<f64> = wav
        .get(at + 8..)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| f64::from(i16::from_le_bytes([c[0], c[1]])))
        .collect();
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    let rms = (samples.iter().map(|s| s * s).sum::<f64>() / samples.len() as f64).sqrt();
    (samples.len() as f64 / f64::from(rate), rms)
}
