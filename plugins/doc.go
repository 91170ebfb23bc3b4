// Package plugins holds rtm's mochi-mqtt hooks. Hooks chooses the hook set
// from configuration; today that is one hook, AuthHook ("rtm-auth"), which
// authenticates devices by token (or lets them in anonymously) and enforces
// the topic namespace of SPEC section 3 plus the extra rules of auth.acl.
// Group topics are checked against a Membership: GroupCache, a broker's
// per-device cache of group memberships (groups.go).
//
// Device credentials themselves (signing and verifying tokens) live in the
// subpackage token, which the push API uses without importing mochi.
//
// Concurrency: mochi calls the hooks from every client's goroutine at once.
// An AuthHook is configured before the server starts and read-only after,
// except for each connection's identity and expiry timer, kept on the
// mochi client itself (a ClientSlot, atomic; a timer fires on a goroutine
// of its own), and its table of client IDs (a mutex, taken at connect and
// disconnect only). OnACLCheck runs for every delivery of every message, so
// it allocates nothing and takes no lock on that path; a GroupCache answer it holds is a sync.Map load and a
// map lookup, and its first question about a device reads the store.
package plugins
