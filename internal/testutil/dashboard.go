package testutil

import (
	"fmt"
	"strconv"
)

// What the watchdog dashboard (watchdog/ui) shows, as JavaScript expressions
// for Browser.WaitTrue, so the dashboard's test against a test API and an
// end-to-end test against real processes assert the same page structure.

// DashboardNodeRows is the number of nodes the dashboard lists.
const DashboardNodeRows = `document.querySelectorAll("#nodes tbody tr").length`

// DashboardNodeState is true when the dashboard lists node in state
// ("alive", "failed", ...).
func DashboardNodeState(node, state string) string {
	return fmt.Sprintf(`document.querySelector('#nodes tr[data-node=%s][data-state=%s]') !== null`,
		strconv.Quote(node), strconv.Quote(state))
}

// DashboardAlertShown is true when the dashboard lists an alert of rule on
// node in state ("pending", "firing", "resolved").
func DashboardAlertShown(rule, node, state string) string {
	return fmt.Sprintf(`document.querySelector('#alerts tr[data-rule=%s][data-node=%s][data-state=%s]') !== null`,
		strconv.Quote(rule), strconv.Quote(node), strconv.Quote(state))
}

// DashboardLive is true while the dashboard follows the event stream.
const DashboardLive = `document.getElementById("conn-status").dataset.state === "live"`
