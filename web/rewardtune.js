// RewardTune front-end extension. For now: give the pack's nodes one recognisable colour so the
// handoff between base and tuned models is easy to spot in a graph. The training panel with live
// curves lands with the trainer node.
import { app } from "../../scripts/app.js";

const RT_PREFIX = "RewardTune";
const RT_COLOR = "#2a3f5a";
const RT_BGCOLOR = "#1c2a3c";

app.registerExtension({
  name: "rewardtune.core",
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
