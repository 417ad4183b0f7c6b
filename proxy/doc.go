// Package proxy is the sidecar itself: it accepts the connections that the
// pod's redirect rules send to the inbound and outbound listeners, decides
// where each one goes, and pumps bytes between the two ends with real
// half-close in both directions. The mesh view it routes by (catalog,
// intentions) lives in sub-packages.
package proxy
