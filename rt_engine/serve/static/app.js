// rt_engine page: upload the chosen files, negotiate a WebRTC session with POST /offer, show the
// returned stream and live stats (server: GET /stats/<session>; browser: RTCPeerConnection.getStats).
"use strict";

const $ = (id) => document.getElementById(id);
const choice = (name) => document.querySelector(`input[name="${name}"]:checked`).value;
let pc = null;
let session = null;
let timer = null;
let localStream = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "err" : "";
}

function authHeaders() {
  const t = $("token").value.trim();
  return t ? { Authorization: "Bearer " + t } : {};
}

async function upload(kind, input) {
  const file = input.files[0];
  if (!file) throw new Error(`choose ${kind === "audio" ? "an" : "a"} ${kind} file first`);
  const form = new FormData();
  form.append("file", file, file.name);
  const r = await fetch(`/upload?kind=${kind}`, { method: "POST", body: form, headers: authHeaders() });
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || `upload failed (${r.status})`);
  return j.upload;
}

function waitIceComplete(conn) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (conn.iceGatheringState === "complete") {
        conn.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 2000); // loopback gathering is instant; do not hang on a slow interface
  });
}

async function start() {
  $("start").disabled = true;
  setStatus("preparing...");
  try {
    const options = { pose: choice("pose") };
    if (choice("identity") === "upload") options.identity_upload = await upload("identity", $("identity-file"));
    const audio = choice("audio");
    options.audio = audio === "mic" ? "mic" : "file";
    if (audio === "upload") options.audio_upload = await upload("audio", $("audio-file"));
    if (options.pose === "file") options.pose_upload = await upload("pose", $("pose-file"));

    const wantMic = options.audio === "mic";
    const wantCam = options.pose === "webcam";
    if (wantMic || wantCam) {
      localStream = await navigator.mediaDevices.getUserMedia({
        audio: wantMic ? { echoCancellation: false, noiseSuppression: false, autoGainControl: true } : false,
        video: wantCam ? { width: 640, height: 480, frameRate: 25 } : false,
      });
    }
    pc = new RTCPeerConnection({ iceServers: [] });
    if (wantMic) pc.addTrack(localStream.getAudioTracks()[0], localStream);
    else pc.addTransceiver("audio", { direction: "recvonly" });
    if (wantCam) pc.addTrack(localStream.getVideoTracks()[0], localStream);
    else pc.addTransceiver("video", { direction: "recvonly" });

    const remote = new MediaStream();
    pc.addEventListener("track", (ev) => {
      remote.addTrack(ev.track);
      $("video").srcObject = remote;
    });
    pc.addEventListener("connectionstatechange", () => {
      setStatus(pc ? pc.connectionState : "closed", pc && pc.connectionState === "failed");
    });

    await pc.setLocalDescription(await pc.createOffer());
    await waitIceComplete(pc);
    setStatus("connecting...");
    const r = await fetch("/offer", {
      method: "POST",
      headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, options }),
    });
    const answer = await r.json();
    if (!r.ok) throw new Error(answer.error || `offer failed (${r.status})`);
    session = answer.session;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    $("stop").disabled = false;
    timer = setInterval(poll, 1000);
  } catch (e) {
    setStatus(String(e.message || e), true);
    await stop();
  }
}

async function poll() {
  if (!pc) return;
  let decoded = 0;
  let fps = null;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      decoded = s.framesDecoded || 0;
      fps = s.framesPerSecond;
    }
  });
  $("decoded").textContent = String(decoded);
  let server = {};
  if (session) {
    try {
      const r = await fetch(`/stats/${session}`);
      if (r.ok) server = await r.json();
    } catch (e) { /* server gone: shown by the connection state */ }
  }
  const lines = [
    `browser fps       ${fps == null ? "-" : fps}`,
    `server fps        ${server.fps ?? "-"} (fresh ${server.fresh_fps ?? "-"})`,
    `frames sent       ${server.frames_sent ?? "-"} (fresh ${server.frames_fresh ?? "-"}, held ${server.frames_held ?? "-"})`,
    `dropped frames    ${server.frames_dropped ?? "-"}`,
    `media->send (ms)  ${server.latency_ms ?? "-"} (algorithmic ${server.algorithmic_latency_ms ?? "-"})`,
    `first frame (s)   ${server.first_frame_s ?? "-"}`,
    `audio input       ${server.audio_input ?? "-"}`,
    `pose              ${server.pose ?? "-"}`,
  ];
  $("stats").textContent = lines.join("\n");
}

async function stop() {
  if (timer) clearInterval(timer);
  timer = null;
  if (session) {
    try { await fetch(`/close/${session}`, { method: "POST", headers: authHeaders() }); } catch (e) { /* ignore */ }
  }
  session = null;
  if (pc) pc.close();
  pc = null;
  if (localStream) localStream.getTracks().forEach((t) => t.stop());
  localStream = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  if ($("status").className !== "err") setStatus("stopped");
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
