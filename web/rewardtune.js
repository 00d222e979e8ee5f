// RewardTune front-end extension: the pack's nodes in one recognisable colour, and the Training tab
// (a sidebar tab) listing training jobs with live reward curves, Cancel, Resume and Remove
// (web/rewardtune_panel.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { JobsPanel, PANEL_CSS, TAB_NAME } from "./rewardtune_panel.js";

const RT_PREFIX = "RewardTune";
export const RT_COLOR = "#2a3f5a";
export const RT_BGCOLOR = "#1c2a3c";

// The frontend's own dialogs and toasts when it has them (ComfyUI frontend ≥ 1.x), else the browser's.
const ui = {
  async confirm(title, message) {
    const dialog = app.extensionManager?.dialog;
    if (dialog?.confirm) return (await dialog.confirm({ title, message, type: "delete" })) === true;
    return window.confirm(`${title}\n\n${message}`);
  },
  toast(severity, summary, detail) {
    const toast = app.extensionManager?.toast;
    if (toast?.add) toast.add({ severity, summary, detail, life: severity === "error" ? 8000 : 3000 });
    else if (severity === "error") console.warn(`RewardTune: ${summary}: ${detail}`);
  },
};

const panel = new JobsPanel(api, ui);

// The pack's websocket messages get their listeners as soon as this file is imported. The frontend
// (1.47) opens its socket right after importing the extensions, before their setup(), and logs a
// message type nobody listens to yet as "Unhandled message … Unknown message type": after a reload
// mid-job the first steps' rewardtune.progress arrived in that gap.
api.addEventListener("rewardtune.progress", (e) => panel.store.onProgress(e.detail));
api.addEventListener("rewardtune.job", (e) => panel.store.onJob(e.detail));
api.addEventListener("rewardtune.removed", (e) => panel.store.onRemoved(e.detail));

// The Templates dialog shows a pack's templates in the order GET /workflow_templates lists them, and
// ComfyUI 0.30 lists example_workflows/ in directory order (an unsorted glob): order ours by their
// leading number. The list is keyed by the pack's folder name, the one this file is served under.
const PACK_FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2));
const listTemplates = api.getWorkflowTemplates?.bind(api);
if (listTemplates) {
  api.getWorkflowTemplates = async () => {
    const listed = await listTemplates();
    if (Array.isArray(listed?.[PACK_FOLDER])) {
      listed[PACK_FOLDER] = [...listed[PACK_FOLDER]].sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
    }
    return listed;
  };
}

app.registerExtension({
  name: "rewardtune.core",
  async setup() {
    const style = document.createElement("style");
    style.id = "rewardtune-panel-css";
    style.textContent = PANEL_CSS;
    document.head.appendChild(style);
    // events sent while the socket was down are lost: read the list again
    api.addEventListener("reconnected", () => panel.refresh());
    app.extensionManager?.registerSidebarTab?.({
      id: "rewardtune-jobs",
      icon: "pi pi-chart-line",
      title: TAB_NAME,
      label: TAB_NAME, // the label under the icon: one short word, or it wraps mid-word
      tooltip: "RewardTune's training jobs",
      type: "custom",
      render: (el) => panel.mount(el),
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(RT_PREFIX)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.color = this.color ?? RT_COLOR;
      this.bgcolor = this.bgcolor ?? RT_BGCOLOR;
      return r;
    };
  },
});
