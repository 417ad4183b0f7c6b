//go:build race

package testkit

// RaceEnabled: built with -race, whose sync.Pool drops items at random and
// whose instrumentation inflates heap figures; allocation tests skip then
// (make unit runs them again without -race).
const RaceEnabled = true
