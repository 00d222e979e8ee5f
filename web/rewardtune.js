// RewardTune front-end extension: the pack's nodes in one recognisable colour, and a sidebar tab
// listing training jobs with live reward curves, Cancel and Resume (web/rewardtune_panel.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { JobsPanel, PANEL_CSS } from "./rewardtune_panel.js";

const RT_PREFIX = "RewardTune";
const RT_COLOR = "#2a3f5a";
const RT_BGCOLOR = "#1c2a3c";

const panel = new JobsPanel(api);

app.registerExtension({
  name: "rewardtune.core",
  async setup() {
    const style = document.createElement("style");
    style.textContent = PANEL_CSS;
    document.head.appendChild(style);
    api.addEventListener("rewardtune.progress", (e) => panel.onProgress(e.detail));
    api.addEventListener("rewardtune.job", (e) => panel.onJob(e.detail));
    app.extensionManager?.registerSidebarTab?.({
      id: "rewardtune.jobs",
      icon: "pi pi-chart-line",
      title: "RewardTune",
      tooltip: "RewardTune training jobs",
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
